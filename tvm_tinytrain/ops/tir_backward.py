"""Backward kernels written directly in TIR, where a tensor-expression pipeline cannot express their loop order.

:func:`depthwise_block_backward` is the backward of a depthwise conv followed, going backwards, by the 1x1
expansion that feeds it (an inverted-residual block): the depthwise input gradient, the expansion's clamp
mask, its bias gradient and its input gradient.  As separate kernels the depthwise input gradient is a whole
float32 tensor (e.g. 96 KB at 96 channels of 16x16); here it exists a few channel planes at a time, consumed at
once by the expansion's gradients.  Each output element sums the same float32 terms in the same order as the
separate kernels of :mod:`.te_backward` (the expansion's input gradient over expanded channels in increasing
order, starting from ``0.0f``), so the results are the same bits.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..errors import TinyTrainError
from . import tir_depthwise, tir_expand_depthwise
from .schedule import cached_kernel, current_variant
from .te_backward import int8_step, int32_step, static_index
from .te_kernels import requantize_value


def _bit(mask, index):
    """Bit ``index`` of a packed clamp mask (LSB first), as a condition."""
    return T.bitwise_and(T.shift_right(mask[index // 8], T.Cast("uint8", index % 8)), T.uint8(1)) != T.uint8(0)


def _bit_select(mask, index, value):
    """``value`` where bit ``index`` of the packed clamp ``mask`` is set, else ``+0.0`` (:func:`.te_backward.apply_mask`)."""
    return T.Select(_bit(mask, index), value, T.float32(0.0))


def _unsaturated(v, conv: dict):
    """The clamp mask's condition on an int8 output ``v`` of ``conv``: strictly inside ``(qmin, qmax)``."""
    # Compared in int32: TVM's simplifier rewrites ``int8 < 127`` into a floor division, a division per test in C.
    v32 = T.Cast("int32", v)
    return tirx.all(v32 > conv["qmin"], v32 < conv["qmax"])


FRONT_PLANES_BYTES = 1024  # the group's bordered output gradient planes: at most one C local (kernel_local_bytes)


def front_group(pixels: int, tile: int, plane_bytes: int) -> int:
    """Channels whose projection fronts :func:`projection_front` sums together: the most, up to 4, that divide
    ``tile`` with at most 16 float32 accumulators (the group times the pixels summed together) and, planes of
    ``plane_bytes`` each, at most :data:`FRONT_PLANES_BYTES` of them (a larger buffer would be an arena workspace,
    at the step's peak in Proxyless' 8x8 blocks)."""
    px = _front_pixels(pixels)
    return max(f for f in (1, 2, 4) if f == 1 or (tile % f == 0 and f * px <= max(16, px) and f * plane_bytes <= FRONT_PLANES_BYTES))


def _front_pixels(pixels: int) -> int:
    """Output pixels (of a channel's ``pixels``, row after row) summed together."""
    return next(n for n in (8, 4, 2, 1) if pixels % n == 0)


def projection_front(projection: int, ho: int, wo: int, group: int = 1, recomputed: dict | None = None,
                     masked_input: bool = False):
    """Two macros for the input gradient of a 1x1 projection (:func:`.te_backward.conv2d_input_grad`: the sum over
    the ``projection`` output channels of ``g``, in increasing order), masked by the clamp of the conv it reads, and
    that conv's bias gradient (:func:`.te_backward.bias_grad`).

    ``sum_group(c, g, g_mask, w_proj, s_proj, out, border)`` writes the unmasked sums of channels ``c .. c + group``
    into ``out[f]`` inside a border of ``border``, a few pixels at a time: each output gradient value loaded serves
    the whole group.  With ``masked_input`` ``g`` is read through the projection's own packed clamp mask ``g_mask``
    (:func:`.te_backward.apply_mask`'s select, element by element): the same terms, with no masked copy of ``g``; a
    mask byte whose 8 pixels all pass, the usual case (a projection rarely saturates), is read without a test each.
    The group's real weights (``w_proj * s_proj``) are computed again for each few pixels, in registers: no
    buffer of them (they were the kernel's largest C local), and the same products.

    ``finish(c, f, mask, b_scale, g_b, gi, out, border, y, yc)`` then masks ``out[f]`` (channel ``c``) in place by the
    bit-packed ``mask``, or, with ``recomputed`` (that conv's quantization), by the int8 outputs ``y[0, yc]`` of
    channel ``c``, and sets ``g_b[gi] = b_scale[c] * sum(plane)``."""
    pixels = ho * wo
    px = _front_pixels(pixels)
    recompute = recomputed is not None

    @T.macro
    def sum_group(c, g, g_mask, w_proj, s_proj, out, border):
        proj_acc = T.alloc_buffer((group, px), "float32", scope="global")
        g_px = T.alloc_buffer((px,), "float32", scope="global")  # the output gradient of px pixels of one channel
        g_flat = T.decl_buffer((projection * pixels,), "float32", data=g.data)
        for q in range(pixels // px):
            for f in T.unroll(group):
                for u in T.unroll(px):
                    proj_acc[f, u] = T.float32(0.0)
            for o in range(projection):
                if masked_input and px == 8:  # the 8 pixels' bits are one mask byte: all set (usual), no test each
                    if g_mask[(o * pixels + q * px) // 8] == T.uint8(255):
                        for u in T.unroll(px):
                            g_px[u] = g_flat[o * pixels + q * px + u]
                    else:
                        for u in T.unroll(px):
                            g_px[u] = _bit_select(g_mask, o * pixels + q * px + u, g_flat[o * pixels + q * px + u])
                else:
                    for u in T.unroll(px):
                        if masked_input:
                            g_px[u] = _bit_select(g_mask, o * pixels + q * px + u, g_flat[o * pixels + q * px + u])
                        else:
                            g_px[u] = g_flat[o * pixels + q * px + u]
                for f in T.unroll(group):
                    for u in T.unroll(px):
                        proj_acc[f, u] = proj_acc[f, u] + g_px[u] * (T.Cast("float32", w_proj[o, c + f, 0, 0]) * s_proj[o])
            for f in T.unroll(group):
                for u in T.unroll(px):
                    out[f, (q * px + u) // wo + border, (q * px + u) % wo + border] = proj_acc[f, u]

    @T.macro
    def finish(c, f, mask, b_scale, g_b, gi, out, border, y, yc):
        g_b[gi] = T.float32(0.0)
        for i, j in T.grid(ho, wo):
            if recompute:
                out[f, i + border, j + border] = T.Select(_unsaturated(y[0, yc, i, j], recomputed), out[f, i + border, j + border],
                                                          T.float32(0.0))
            else:
                out[f, i + border, j + border] = _bit_select(mask, (c * ho + i) * wo + j, out[f, i + border, j + border])
            g_b[gi] = g_b[gi] + out[f, i + border, j + border]
        g_b[gi] = b_scale[c] * g_b[gi]

    return sum_group, finish


@cached_kernel
def projection_bias_grad(channels: int, projection: int, h: int, w: int, masked_input: bool = False):
    """PrimFunc ``(g_out, w_proj, s_proj, mask, b_scale) -> g_b``: the bias gradient of a conv of ``channels`` outputs
    ``h x w`` read by a 1x1 projection of ``projection`` outputs, through the conv's clamp ``mask``, from the
    projection's output gradient: input gradient -> mask -> bias gradient, a group of channel planes at a time (one
    in the reference variant), where the backward stops after that bias (the planes of the projection's input
    gradient are the only workspace).  With ``masked_input``, ``g_out`` is read through the projection's packed clamp
    mask ``g_mask``, an input after it."""
    group = front_group(h * w, channels, h * w * 4) if current_variant() == "optimized" else 1
    sum_group, finish = projection_front(projection, h, w, group, masked_input=masked_input)

    @T.prim_func(private=True)
    def kernel(g_out: T.Buffer((1, projection, h, w), "float32"), g_mask: T.Buffer(((projection * h * w + 7) // 8,), "uint8"),
               w_proj: T.Buffer((projection, channels, 1, 1), "int8"), s_proj: T.Buffer((projection,), "float32"),
               mask: T.Buffer(((channels * h * w + 7) // 8,), "uint8"), b_scale: T.Buffer((channels,), "float32"),
               g_b: T.Buffer((channels,), "float32")):
        planes = T.alloc_buffer((group, h, w), "float32", scope="global")
        for c0 in range(channels // group):
            sum_group(c0 * group, g_out, g_mask, w_proj, s_proj, planes, 0)
            for f in range(group):
                finish(c0 * group + f, f, mask, b_scale, g_b, c0 * group + f, planes, 0, None, 0)

    return _signature(kernel, ["g_out", *(["g_mask"] if masked_input else []), "w_proj", "s_proj", "mask", "b_scale", "g_b"])


@cached_kernel
def depthwise_block_backward(channels: int, in_channels: int, h: int, w: int, ho: int, wo: int, k: int, stride: int,
                             trained_x_zero: int | None = None, tile: int = 1, projection: int | None = None,
                             merged: tuple[int, ...] | None = None, recompute: tuple[dict, dict, bool, bool] | None = None,
                             input_grad: bool = True, masked_front: bool = False, update_biases: bool = False):
    """PrimFunc ``(g, w_dw, s_dw, mask, b_scale, w_pw, s_pw) -> (g_x, g_b)`` for one depthwise conv of
    ``channels`` planes ``h x w -> ho x wo`` (kernel ``k``, ``stride``, padding ``(k-1)//2``) whose input is a 1x1 conv
    of ``in_channels``.  ``mask`` is the expansion's packed clamp mask; ``g_b = b_scale * sum(masked gradient)``
    per channel (:func:`.te_backward.bias_grad`), ``g_x`` the expansion's input gradient.

    The masked planes are built ``tile`` channels at a time (``tile`` divides ``channels``; 1 is the plainest
    form, plane by plane).  Each element of ``g_x`` then takes the tile's terms in one register pass, and each
    expansion input pixel converted for a weight gradient serves the whole tile, instead of one pass over
    ``g_x`` in memory per plane; two input channels are taken together, so each plane value loaded serves
    both.  A plane element sums only the taps of its stride parity, with the channel's real weights computed
    once, and reads the output gradient from a copy inside a zero border instead of testing each tap's bounds;
    the plane is built one stride parity class of pixels at a time (at strides 1 and 2), whose taps are constants,
    unrolled, each weight serving a few pixels of a row in the optimized variant.  With ``projection`` the fronts
    of a few channels of the tile are summed together (:func:`front_group`).  The terms skipped or read from the
    border are ``+-0.0``, which change no sum that starts at ``+0.0``: the sums are those of the separate kernels.

    With ``trained_x_zero`` (the zero point of the expansion's input) the expansion's weight is trained too:
    ``(w_pw, g, w_dw, s_dw, mask, b_scale, s_pw, x, w_scale, lr) -> (w_new, g_x, g_b)`` also applies its SGD step
    (:func:`.te_backward.conv2d_weight_grad_sgd` over input ``x``).  Its gradient row ``c`` needs masked plane ``c``
    only, so the tile's rows are updated as soon as its planes have added into ``g_x`` with the old rows: ``w_new``
    may be ``w_pw`` itself (in place, as the C step runs it).

    With ``projection`` (the output channels of the block's 1x1 projection, which reads the depthwise output)
    the kernel starts one step earlier: ``g`` is replaced by ``(g_out, w_proj, s_proj, mask_dw, b_scale_dw)``
    and ``g_b_dw`` is appended to the outputs.  Plane ``c`` of the depthwise output gradient is then the
    projection's input gradient for channel ``c`` (:func:`.te_backward.conv2d_input_grad`: the sum over the
    projection's outputs, in increasing order), masked by the depthwise conv's clamp, and ``g_b_dw`` the
    depthwise bias gradient: the tensor of the expanded width never exists, on either side of the depthwise
    conv.

    With ``merged`` (and ``trained_x_zero``) the expansion is trained on those input channels only (SparseUpdate's
    merge, :func:`.te_backward.merge_channels`): ``w_pw`` is then the trained slice ``(channels, len(merged))``,
    updated in place from ``x`` holding those input channels, and the frozen whole weight comes as one more input
    after ``lr``; the input gradient reads the merge of the two.

    With ``recompute = (expand, depthwise, wide_expand, wide_depthwise)`` (and ``trained_x_zero``, ``projection``, no
    ``merged``) the two clamp masks are not inputs: the kernel recomputes them from ``x``, the whole expansion input
    it has for the weight gradient anyway.  Channel ``c``'s expanded plane and depthwise output are the forward's
    (the same integer sums and requantization, ``expand`` and ``depthwise`` holding each conv's ``x_zero``,
    ``y_zero``, ``qmin``, ``qmax``, and the wide flags their :func:`.te_kernels.scale_shift` modes), from the old
    weight row ``c`` and the biases, which the step updates only after this kernel (the optimized variant makes two
    channels of a front group at a time, :func:`.tir_expand_depthwise.expansion_plane`, before either's bias step);
    ``mask`` and ``mask_dw`` give way to ``(b1, m1, s1, b2, m2, s2)`` after ``lr``, the bias, multiplier and shift of
    the expansion and the depthwise conv.

    Without ``input_grad`` (the block where the backward stops) there is no ``g_x``, nor the expansion's ``s_pw``,
    and an untrained expansion's ``w_pw``; a trained slice is then just the weight (give no ``merged``).

    With ``masked_front`` (and ``projection``) ``g_out`` is read through the projection's packed clamp mask ``g_mask``,
    an input right after it (:func:`projection_front`): a residual block's output gradient that the skip path still
    reads needs no masked copy.

    With ``update_biases`` the bias gradients are not outputs: each channel's SGD step
    (:func:`.te_backward.sgd_update_int32`) is applied as soon as its gradient is summed, in place on the bias, whose
    old value channel ``c`` has read by then (a recomputed mask reads only its own channel): ``g_b`` gives way to
    ``b1_new`` over ``b1``, the expansion's bias, and ``g_b_dw`` to ``b2_new`` over ``b2``, the depthwise conv's, each
    input (with ``lr``) where the form has none.  The attribute ``tinytrain.in_place`` lists each output written over
    an input as ``[output, input]`` (the trained weight's too).
    """
    if merged is not None and (trained_x_zero is None or not input_grad):
        raise TinyTrainError("depthwise_block_backward: a merged expansion weight is a trained one read by the input "
                             "gradient (give trained_x_zero and input_grad)")
    if recompute is not None and (trained_x_zero is None or projection is None or merged is not None):
        raise TinyTrainError("depthwise_block_backward: recomputing the masks needs a wholly trained expansion and the "
                             "projection's front (trained_x_zero, projection, no merged)")
    if masked_front and projection is None:
        raise TinyTrainError("depthwise_block_backward: masked_front reads the projection's output gradient (give projection)")
    if tile < 1 or channels % tile:
        raise TinyTrainError(f"depthwise_block_backward: tile {tile} does not divide {channels} channels")
    pad = (k - 1) // 2
    taps = -(-k // stride)  # the most taps of one parity along an axis
    rows, cols = (h - 1 + pad) // stride + taps, (w - 1 + pad) // stride + taps
    mask_bytes = (channels * h * w + 7) // 8
    mask_dw_bytes = (channels * ho * wo + 7) // 8
    proj = projection or 1
    pair = 2 if in_channels % 2 == 0 else 1  # expansion input channels taken together: each plane load serves both
    n_w = in_channels if merged is None else len(merged)  # input channels of the trained weight, and of x
    pair_w = 2 if n_w % 2 == 0 else 1
    slot = [-1] * in_channels  # each input channel's column in the trained slice, -1: frozen
    for j, ch in enumerate(merged or range(in_channels)):
        slot[ch] = j

    def parity_pixels(rx: int) -> int:
        """Pixels of a row of stride parity class ``rx`` summed together (one at a time in the reference variant)."""
        if current_variant() != "optimized":
            return 1
        return next(n for n in (4, 2, 1) if (w - rx + stride - 1) // stride % n == 0)
    expand_q, dw_q, wide_expand, wide_dw = recompute or ({}, {}, False, False)
    # The optimized variant recomputes the expanded plane on the DSP instructions where their shape allows.
    dsp_expand = recompute is not None and current_variant() == "optimized" and tir_expand_depthwise.fits(in_channels, 1, w)
    dw_channel = tir_depthwise.plane_conv(k, stride, ho, wo, dw_q, wide_dw) if recompute else None
    recompute_masks = recompute is not None

    # Channels whose projection fronts are summed together (one without a front: the kernel reads their gradient).
    group = front_group(ho * wo, tile, rows * cols * 4) if projection is not None else 1
    sum_group, finish = projection_front(projection or 1, ho, wo, group, dw_q if recompute_masks else None, masked_front)
    # Channels of the group recomputed together, sharing the expansion input's halfword pairs.
    n_rec = tir_expand_depthwise.channels_per_pass(group, (h + 2 * pad) * (w + 2 * pad)) if dsp_expand else 1
    expand_channels = tir_expand_depthwise.expansion_plane(in_channels, h, w, pad, expand_q, wide_expand, n_rec) if dsp_expand else None
    plane_shape, dw_y_shape = ((n_rec, h + 2 * pad, w + 2 * pad), (1, n_rec, ho, wo)) if recompute_masks else ((1, 1, 1), (1, 1, 1, 1))

    @T.macro
    def recompute_channels(c, x, w_pw, w_dw, b1, m1, s1, b2, m2, s2, plane, dw_y, r_acc, r_start, r_params, r_pairs, r_lanes, r_taps):
        """Channels ``c .. c + n_rec``: expanded planes ``plane[f]`` (inside the depthwise zero border) and depthwise
        outputs ``dw_y[0, f]``, as the forward."""
        if dsp_expand:
            pixels = T.decl_buffer((in_channels * h * w,), "int8", data=x.data)
            weight_rows = T.decl_buffer((channels * in_channels,), "int8", data=w_pw.data)
            expand_channels(pixels, weight_rows, b1, m1, s1, c, r_start, r_pairs, r_lanes, r_params, r_acc, plane)
        else:
            for y, xx in T.grid(h, w):
                r_acc[0] = 0
                for i in range(in_channels):
                    r_acc[0] = r_acc[0] + (T.Cast("int32", x[0, i, y, xx]) - trained_x_zero) * T.Cast("int32", w_pw[c, i, 0, 0])
                plane[0, y + pad, xx + pad] = requantize_value(r_acc[0], b1[c], m1[c], s1[c], expand_q["y_zero"], expand_q["qmin"],
                                                               expand_q["qmax"], wide_expand)
        for f in range(n_rec):
            dw_channel(plane, f, w_dw, b2, m2, s2, c + f, r_start, r_params, r_acc, r_taps, dw_y, f)

    @T.macro
    def plane_bias_grad(planes, t, b_scale, c, g_b, gi):
        """``g_b[gi]``: channel ``c``'s bias gradient, ``b_scale[c]`` times the sum of its masked plane ``t``."""
        g_b[gi] = T.float32(0.0)
        for y, xx in T.grid(h, w):
            g_b[gi] = g_b[gi] + planes[t, y, xx]
        g_b[gi] = b_scale[c] * g_b[gi]

    def masked_plane_value(c, y, xx, value, plane, pf, mask):
        """``value`` where the expansion's clamp passes pixel ``(y, xx)`` of channel ``c`` (recomputed: ``plane[pf]``),
        else 0."""
        if recompute_masks:
            return T.Select(_unsaturated(plane[pf, y + pad, xx + pad], expand_q), value, T.float32(0.0))
        return _bit_select(mask, (c * h + y) * w + xx, value)

    @T.macro
    def parity_class(ry, rx, c, t, f, planes, g_pad, dw_real, dw_acc, plane, pf, mask):
        """Plane ``t`` (channel ``c``) at the pixels ``y % stride == ry``, ``xx % stride == rx``: the taps
        kh = (y + pad) % stride + stride * jh < k, in increasing order (kw likewise), read output row
        (y + pad) // stride - jh of ``g_pad[f]``, whose border stands for the rows outside the output.  Within a class
        the taps are the same constants for every pixel: unrolled, and each weight loaded serves a few pixels."""
        for yy, xq in T.grid((h - ry + stride - 1) // stride, (w - rx + stride - 1) // stride // parity_pixels(rx)):
            for u in T.unroll(parity_pixels(rx)):
                dw_acc[u] = T.float32(0.0)
            for jh in T.unroll((k - (ry + pad) % stride + stride - 1) // stride):
                for jw in T.unroll((k - (rx + pad) % stride + stride - 1) // stride):
                    for u in T.unroll(parity_pixels(rx)):
                        dw_acc[u] = dw_acc[u] + (
                            g_pad[f, yy + (ry + pad) // stride - jh + taps - 1,
                                  xq * parity_pixels(rx) + u + (rx + pad) // stride - jw + taps - 1]
                            * dw_real[(ry + pad) % stride + stride * jh, (rx + pad) % stride + stride * jw])
            for u in T.unroll(parity_pixels(rx)):
                planes[t, yy * stride + ry, (xq * parity_pixels(rx) + u) * stride + rx] = masked_plane_value(
                    c, yy * stride + ry, (xq * parity_pixels(rx) + u) * stride + rx, dw_acc[u], plane, pf, mask)

    @T.macro
    def channel_backward(c, t, f, pf, g, w_dw, s_dw, mask, b_scale, lr, g_b, mask_dw, b_scale_dw, g_b_dw, b1, b2, b1_new, b2_new,
                         planes, g_pad, dw_real, dw_acc, plane, dw_y, g_bias):
        """Channel ``c``'s masked depthwise input gradient into ``planes[t]`` from its output gradient ``g_pad[f]``
        (the projection's front summed there already), and the bias gradients (or steps) this yields; a recomputed
        mask reads ``plane[pf]`` and ``dw_y[0, pf]``."""
        for rh, rw in T.grid(k, k):
            dw_real[rh, rw] = T.Cast("float32", w_dw[c, 0, rh, rw]) * s_dw[c]
        if projection is None:
            for i, j in T.grid(ho, wo):
                g_pad[0, i + taps - 1, j + taps - 1] = g[0, c, i, j]
        elif update_biases:  # masked by the depthwise clamp
            finish(c, f, mask_dw, b_scale_dw, g_bias, 1, g_pad, taps - 1, dw_y, pf)
            b2_new[c] = int32_step(b2[c], lr, g_bias[1])
        else:
            finish(c, f, mask_dw, b_scale_dw, g_b_dw, c, g_pad, taps - 1, dw_y, pf)
        if stride <= 2:  # each stride parity class of pixels on its own: its taps are constants (below)
            parity_class(0, 0, c, t, f, planes, g_pad, dw_real, dw_acc, plane, pf, mask)
            if stride == 2:
                parity_class(0, 1, c, t, f, planes, g_pad, dw_real, dw_acc, plane, pf, mask)
                parity_class(1, 0, c, t, f, planes, g_pad, dw_real, dw_acc, plane, pf, mask)
                parity_class(1, 1, c, t, f, planes, g_pad, dw_real, dw_acc, plane, pf, mask)
        else:
            for y, xx in T.grid(h, w):
                dw_acc[0] = T.float32(0.0)
                for jh in range((k - (y + pad) % stride + stride - 1) // stride):
                    for jw in range((k - (xx + pad) % stride + stride - 1) // stride):
                        dw_acc[0] = dw_acc[0] + (g_pad[f, (y + pad) // stride - jh + taps - 1, (xx + pad) // stride - jw + taps - 1]
                                                 * dw_real[(y + pad) % stride + stride * jh, (xx + pad) % stride + stride * jw])
                planes[t, y, xx] = masked_plane_value(c, y, xx, dw_acc[0], plane, pf, mask)
        if update_biases:
            plane_bias_grad(planes, t, b_scale, c, g_bias, 0)
            b1_new[c] = int32_step(b1[c], lr, g_bias[0])
        else:
            plane_bias_grad(planes, t, b_scale, c, g_b, c)

    @T.macro
    def block_backward(g, g_mask, w_dw, s_dw, mask, b_scale, w_pw, s_pw, x, w_scale, lr, g_x, g_b, w_new, w_proj, s_proj, mask_dw,
                       b_scale_dw, g_b_dw, frozen, b1, m1, s1, b2, m2, s2, b1_new, b2_new):
        planes = T.alloc_buffer((tile, h, w), "float32", scope="global")
        g_pad = T.alloc_buffer((group, rows, cols), "float32", scope="global")  # the group's output gradients in a zero border
        dw_real = T.alloc_buffer((k, k), "float32", scope="global")  # channel c's real depthwise weights
        dw_acc = T.alloc_buffer((4,), "float32", scope="global")  # a few pixels of a masked plane
        pw_real = T.alloc_buffer((pair, tile), "float32", scope="global")  # the pair's real expansion weights in the tile
        acc = T.alloc_buffer((pair_w, tile), "float32", scope="global")
        two = T.alloc_buffer((max(pair, pair_w),), "float32", scope="global")  # elements of g_x, or input values
        # Recomputed masks: channel c's expanded plane in the depthwise zero border, and its depthwise output.
        plane = T.alloc_buffer(plane_shape, "int8", scope="global")
        dw_y = T.alloc_buffer(dw_y_shape, "int8", scope="global")
        r_acc = T.alloc_buffer((4 * n_rec,), "int32", scope="global")
        r_start = T.alloc_buffer((n_rec,), "int32", scope="global")
        r_params = T.alloc_buffer((3 * n_rec,), "int32", scope="global")
        r_pairs = T.alloc_buffer((2 * n_rec,), "int32", scope="global")
        r_lanes = T.alloc_buffer((6,), "int32", scope="global")
        r_taps = T.alloc_buffer((tir_depthwise.tap_scratch(k, stride, wo) if recompute_masks else 1,), "int32", scope="global")
        g_bias = T.alloc_buffer((2,), "float32", scope="global")  # update_biases: channel c's two bias gradients
        column = T.alloc_buffer((pair,), "int32", scope="global")
        if input_grad:
            for ci, y, xx in T.grid(in_channels, h, w):
                g_x[0, ci, y, xx] = T.float32(0.0)
        for f, i, j in T.grid(group, rows, cols):  # the border; each channel overwrites the inside
            g_pad[f, i, j] = T.float32(0.0)
        if recompute_masks:
            for f, i, j in T.grid(n_rec, h + 2 * pad, w + 2 * pad):
                plane[f, i, j] = T.int8(dw_q["x_zero"])
        for c0 in range(channels // tile):
            for t0 in range(tile // group):
                if projection is not None:  # g is the projection's output gradient: the group's input gradients
                    sum_group(c0 * tile + t0 * group, g, g_mask, w_proj, s_proj, g_pad, taps - 1)
                for f2 in range(group // n_rec):
                    if recompute_masks:
                        recompute_channels(c0 * tile + t0 * group + f2 * n_rec, x, w_pw, w_dw, b1, m1, s1, b2, m2, s2, plane, dw_y,
                                           r_acc, r_start, r_params, r_pairs, r_lanes, r_taps)
                    for pf in range(n_rec):  # the depthwise input gradient of channel c, masked by the expansion's clamp
                        channel_backward(c0 * tile + t0 * group + f2 * n_rec + pf, t0 * group + f2 * n_rec + pf, f2 * n_rec + pf, pf,
                                         g, w_dw, s_dw, mask, b_scale, lr, g_b, mask_dw, b_scale_dw, g_b_dw, b1, b2, b1_new, b2_new,
                                         planes, g_pad, dw_real, dw_acc, plane, dw_y, g_bias)
            if input_grad:
                for ci2 in range(in_channels // pair):
                    if merged is not None:  # each input channel's column in the trained slice, looked up once for the tile
                        for s in T.unroll(pair):
                            column[s] = static_index(ci2 * pair + s, slot)
                    for s, t in T.grid(pair, tile):
                        if merged is None:
                            pw_real[s, t] = T.Cast("float32", w_pw[c0 * tile + t, ci2 * pair + s, 0, 0]) * s_pw[c0 * tile + t]
                        else:  # the merge: the trained slice's column where the channel has one, else the frozen weight (lazy)
                            pw_real[s, t] = T.Cast("float32", T.if_then_else(
                                column[s] >= 0, w_pw[c0 * tile + t, column[s], 0, 0],
                                frozen[c0 * tile + t, ci2 * pair + s, 0, 0])) * s_pw[c0 * tile + t]
                    for y, xx in T.grid(h, w):
                        for s in T.unroll(pair):
                            two[s] = g_x[0, ci2 * pair + s, y, xx]
                        for t in T.unroll(tile):
                            for s in T.unroll(pair):
                                two[s] = two[s] + planes[t, y, xx] * pw_real[s, t]
                        for s in T.unroll(pair):
                            g_x[0, ci2 * pair + s, y, xx] = two[s]
            if trained_x_zero is not None:  # the tile's weight rows, after g_x has read their old values
                for j2 in range(n_w // pair_w):
                    for s in T.unroll(pair_w):
                        for t in T.unroll(tile):
                            acc[s, t] = T.float32(0.0)
                    for y, xx in T.grid(h, w):
                        for s in T.unroll(pair_w):
                            two[s] = T.Cast("float32", T.Cast("int32", x[0, j2 * pair_w + s, y, xx]) - trained_x_zero)
                        for t in T.unroll(tile):
                            for s in T.unroll(pair_w):
                                acc[s, t] = acc[s, t] + planes[t, y, xx] * two[s]
                    for s in T.unroll(pair_w):
                        for t in T.unroll(tile):
                            w_new[c0 * tile + t, j2 * pair_w + s, 0, 0] = int8_step(w_pw[c0 * tile + t, j2 * pair_w + s, 0, 0], lr,
                                                                                   w_scale[c0 * tile + t] * acc[s, t])

    # Every buffer any form reads or writes; each form keeps its own in its own order (``_signature``).
    @T.prim_func(private=True)
    def kernel(g: T.Buffer((1, channels if projection is None else projection, ho, wo), "float32"),
               g_mask: T.Buffer(((proj * ho * wo + 7) // 8,), "uint8"), w_proj: T.Buffer((proj, channels, 1, 1), "int8"), s_proj: T.Buffer((proj,), "float32"),
               mask_dw: T.Buffer((mask_dw_bytes,), "uint8"), b_scale_dw: T.Buffer((channels,), "float32"),
               w_dw: T.Buffer((channels, 1, k, k), "int8"), s_dw: T.Buffer((channels,), "float32"),
               mask: T.Buffer((mask_bytes,), "uint8"), b_scale: T.Buffer((channels,), "float32"),
               w_pw: T.Buffer((channels, n_w, 1, 1), "int8"), s_pw: T.Buffer((channels,), "float32"),
               x: T.Buffer((1, n_w, h, w), "int8"), w_scale: T.Buffer((channels,), "float32"), lr: T.Buffer((1,), "float32"),
               frozen: T.Buffer((channels, in_channels, 1, 1), "int8"),
               b1: T.Buffer((channels,), "int32"), m1: T.Buffer((channels,), "int32"), s1: T.Buffer((channels,), "int32"),
               b2: T.Buffer((channels,), "int32"), m2: T.Buffer((channels,), "int32"), s2: T.Buffer((channels,), "int32"),
               g_x: T.Buffer((1, in_channels, h, w), "float32"), g_b: T.Buffer((channels,), "float32"),
               w_new: T.Buffer((channels, n_w, 1, 1), "int8"), g_b_dw: T.Buffer((channels,), "float32"),
               b1_new: T.Buffer((channels,), "int32"), b2_new: T.Buffer((channels,), "int32")):
        block_backward(g, g_mask, w_dw, s_dw, mask, b_scale, w_pw, s_pw, x, w_scale, lr, g_x, g_b, w_new, w_proj, s_proj, mask_dw,
                       b_scale_dw, g_b_dw, frozen, b1, m1, s1, b2, m2, s2, b1_new, b2_new)

    front = ["g", *(["g_mask"] if masked_front else []), "w_proj", "s_proj", "mask_dw", "b_scale_dw"] if projection is not None else ["g"]
    if trained_x_zero is None:
        inputs = [*front, "w_dw", "s_dw", "mask", "b_scale", "w_pw", "s_pw"]
    else:  # the weight first, updated in place (the first output too); a merged expansion's frozen weight after lr
        inputs = ["w_pw", *front, "w_dw", "s_dw", "mask", "b_scale", "s_pw", "x", "w_scale", "lr",
                  *(["frozen"] if merged is not None else [])]
    if recompute:
        inputs = [n for n in inputs if n not in ("mask", "mask_dw")] + ["b1", "m1", "s1", "b2", "m2", "s2"]
    if not input_grad:
        inputs = [n for n in inputs if n not in ("s_pw", *(["w_pw"] if trained_x_zero is None else []))]
    outputs = [*(["w_new"] if trained_x_zero is not None else []), *(["g_x"] if input_grad else []), "g_b",
               *(["g_b_dw"] if projection is not None else [])]
    if update_biases:
        inputs += [n for n in ("lr", "b1", *(["b2"] if projection is not None else [])) if n not in inputs]
        outputs = [{"g_b": "b1_new", "g_b_dw": "b2_new"}.get(n, n) for n in outputs]
    over = {"w_new": "w_pw", "b1_new": "b1", "b2_new": "b2"}
    in_place = [[k, inputs.index(over[n])] for k, n in enumerate(outputs) if n in over]
    return _signature(kernel, inputs + outputs).with_attr("tinytrain.in_place", in_place)


@cached_kernel
def residual_block_backward(channels: int, width: int, h: int, w: int, k: int, band: int, masked_front: bool = False,
                            update_biases: bool = False):
    """PrimFunc ``(g, w_proj, s_proj, mask_dw, b_scale_dw, w_dw, s_dw, mask, b_scale, w_pw, s_pw) -> (g_sum, g_b,
    g_b_dw)``: the backward of a residual inverted block whose weights are frozen (``width`` channels ``h x w``, a 1x1
    expansion to ``channels``, a stride-1 depthwise conv of kernel ``k``, the 1x1 projection back), from ``g``, the
    gradient of the block's output, to ``g_sum``, the gradient of its input: ``g`` (the skip path) plus the branch's
    input gradient, as :func:`depthwise_block_backward` with ``projection`` then ``add_f32`` give it.  The form and
    the bias outputs (``masked_front``, ``update_biases``) are :func:`depthwise_block_backward`'s.

    ``g_sum`` may be ``g`` itself: the kernel works in bands of ``band`` rows, top to bottom.  A band's input
    gradient reads the projection's front over the band and ``pad`` rows either side; the front is summed there for
    one expanded channel at a time, then its depthwise input gradient and expansion input gradient, into the band's
    accumulators.  The ``pad`` rows above the band were overwritten by the band before, so the kernel copies each
    band's last ``pad`` rows of ``g`` before writing it.  Two float32 tensors of the block's width were alive
    before; now one is, plus a band and ``pad`` rows of it, for the front computed ``(band + 2 * pad) / band``
    times.  Every element sums the same terms in the same order as the separate kernels, and the bias sums run
    over the bands in row order: the same bits."""
    pad = (k - 1) // 2
    if band < 1 or h % band or (band < h and band < pad):
        raise TinyTrainError(f"residual_block_backward: a band of {band} rows must divide the {h} rows and, unless it is "
                             f"all of them, cover the {pad} rows of the kernel's reach")
    bands = h // band
    mask_bytes = (channels * h * w + 7) // 8

    byte_rows = masked_front and w % 8 == 0  # each mask byte is 8 pixels of one row: one test for 8 where all pass

    @T.macro
    def front_row(src, q, g_mask, row, w_real, row_acc):
        """``row_acc``: the projection's input gradient along row ``row`` for the channel whose real weights are
        ``w_real``, summed over the output channels ``o`` of ``src[o, q, :]``, which holds row ``row`` of ``g`` (read
        through the projection's clamp mask with ``masked_front``; a mask byte whose 8 pixels all pass, the usual
        case, without a test each).  Each pixel's terms in increasing ``o``, as the separate kernels sum them."""
        for j in range(w):
            row_acc[j] = T.float32(0.0)
        for o in range(width):
            if byte_rows:
                for j8 in range(w // 8):
                    if g_mask[((o * h + row) * w) // 8 + j8] == T.uint8(255):
                        for u in T.unroll(8):
                            row_acc[j8 * 8 + u] = row_acc[j8 * 8 + u] + src[o, q, j8 * 8 + u] * w_real[o]
                    else:
                        for u in T.unroll(8):
                            row_acc[j8 * 8 + u] = row_acc[j8 * 8 + u] + _bit_select(
                                g_mask, (o * h + row) * w + j8 * 8 + u, src[o, q, j8 * 8 + u]) * w_real[o]
            else:
                for j in range(w):
                    if masked_front:
                        row_acc[j] = row_acc[j] + _bit_select(g_mask, (o * h + row) * w + j, src[o, q, j]) * w_real[o]
                    else:
                        row_acc[j] = row_acc[j] + src[o, q, j] * w_real[o]

    @T.prim_func(private=True)
    def kernel(g: T.Buffer((1, width, h, w), "float32"), g_mask: T.Buffer(((width * h * w + 7) // 8,), "uint8"),
               w_proj: T.Buffer((width, channels, 1, 1), "int8"), s_proj: T.Buffer((width,), "float32"),
               mask_dw: T.Buffer((mask_bytes,), "uint8"), b_scale_dw: T.Buffer((channels,), "float32"),
               w_dw: T.Buffer((channels, 1, k, k), "int8"), s_dw: T.Buffer((channels,), "float32"),
               mask: T.Buffer((mask_bytes,), "uint8"), b_scale: T.Buffer((channels,), "float32"),
               w_pw: T.Buffer((channels, width, 1, 1), "int8"), s_pw: T.Buffer((channels,), "float32"),
               lr: T.Buffer((1,), "float32"), b1: T.Buffer((channels,), "int32"), b2: T.Buffer((channels,), "int32"),
               g_sum: T.Buffer((1, width, h, w), "float32"), g_b: T.Buffer((channels,), "float32"),
               g_b_dw: T.Buffer((channels,), "float32"), b1_new: T.Buffer((channels,), "int32"),
               b2_new: T.Buffer((channels,), "int32")):
        prev = T.alloc_buffer((width, max(pad, 1), w), "float32", scope="global")  # g's rows above the band, as they were
        acc = T.alloc_buffer((width, band, w), "float32", scope="global")  # the branch's input gradient over the band
        # Channel c's masked depthwise output gradient over the band and pad rows either side, in a zero border.
        front = T.alloc_buffer((band + 2 * pad, w + 2 * pad), "float32", scope="global")
        plane = T.alloc_buffer((band, w), "float32", scope="global")  # its masked depthwise input gradient
        dw_real = T.alloc_buffer((k, k), "float32", scope="global")
        sums = T.alloc_buffer((2, channels), "float32", scope="global")  # the bias gradients' sums, over the bands
        one = T.alloc_buffer((1,), "float32", scope="global")
        w_real = T.alloc_buffer((width,), "float32", scope="global")  # channel c's real projection weights
        row_acc = T.alloc_buffer((w,), "float32", scope="global")
        rows = T.decl_buffer((width, h, w), "float32", data=g.data)
        for c in range(channels):
            sums[0, c] = T.float32(0.0)
            sums[1, c] = T.float32(0.0)
        for r in range(bands):
            for ci, y, x in T.grid(width, band, w):
                acc[ci, y, x] = T.float32(0.0)
            for c in range(channels):
                for i, j in T.grid(band + 2 * pad, w + 2 * pad):
                    front[i, j] = T.float32(0.0)
                for o in range(width):
                    w_real[o] = T.Cast("float32", w_proj[o, c, 0, 0]) * s_proj[o]
                for i in range(band + 2 * pad):
                    if tirx.all(r * band - pad + i >= 0, r * band - pad + i < h):
                        if i < pad:  # above the band: overwritten in g, kept in prev
                            front_row(prev, i, g_mask, r * band - pad + i, w_real, row_acc)
                        else:
                            front_row(rows, r * band - pad + i, g_mask, r * band - pad + i, w_real, row_acc)
                        for j in range(w):
                            front[i, j + pad] = _bit_select(mask_dw, (c * h + r * band - pad + i) * w + j, row_acc[j])
                            if tirx.all(i >= pad, i < pad + band):  # the band's own rows, once each, in row order
                                sums[1, c] = sums[1, c] + front[i, j + pad]
                for rh, rw in T.grid(k, k):
                    dw_real[rh, rw] = T.Cast("float32", w_dw[c, 0, rh, rw]) * s_dw[c]
                for y, x in T.grid(band, w):
                    one[0] = T.float32(0.0)
                    for jh in T.unroll(k):  # constant offsets: k is small
                        for jw in T.unroll(k):
                            one[0] = one[0] + front[y + 2 * pad - jh, x + 2 * pad - jw] * dw_real[jh, jw]
                    plane[y, x] = _bit_select(mask, (c * h + r * band + y) * w + x, one[0])
                    sums[0, c] = sums[0, c] + plane[y, x]
                for ci in range(width):
                    one[0] = T.Cast("float32", w_pw[c, ci, 0, 0]) * s_pw[c]
                    for y, x in T.grid(band, w):
                        acc[ci, y, x] = acc[ci, y, x] + plane[y, x] * one[0]
            if r < bands - 1:  # before g_sum overwrites them: the next band's rows above it
                for o, q, j in T.grid(width, pad, w):
                    prev[o, q, j] = g[0, o, (r + 1) * band - pad + q, j]
            for ci, y, x in T.grid(width, band, w):
                g_sum[0, ci, r * band + y, x] = g[0, ci, r * band + y, x] + acc[ci, y, x]
        for c in range(channels):
            if update_biases:
                b1_new[c] = int32_step(b1[c], lr, b_scale[c] * sums[0, c])
                b2_new[c] = int32_step(b2[c], lr, b_scale_dw[c] * sums[1, c])
            else:
                g_b[c] = b_scale[c] * sums[0, c]
                g_b_dw[c] = b_scale_dw[c] * sums[1, c]

    inputs = ["g", *(["g_mask"] if masked_front else []), "w_proj", "s_proj", "mask_dw", "b_scale_dw", "w_dw", "s_dw", "mask",
              "b_scale", "w_pw", "s_pw", *(["lr", "b1", "b2"] if update_biases else [])]
    outputs = ["g_sum", *(["b1_new", "b2_new"] if update_biases else ["g_b", "g_b_dw"])]
    in_place = [[1, inputs.index("b1")], [2, inputs.index("b2")]] if update_biases else []
    return _signature(kernel, inputs + outputs).with_attr("tinytrain.in_place", in_place)


def _signature(func: tirx.PrimFunc, names: list[str]) -> tirx.PrimFunc:
    """``func`` with only the buffer parameters ``names``, in that order (the body must not touch the others)."""
    by_name = {p.name: p for p in func.params}
    return tirx.PrimFunc([by_name[n] for n in names], func.body, func.ret_type, func.attrs)
