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


def _unsaturated(v, conv: dict):
    """The clamp mask's condition on an int8 output ``v`` of ``conv``: strictly inside ``(qmin, qmax)``."""
    return tirx.all(v > T.int8(conv["qmin"]), v < T.int8(conv["qmax"]))


def projection_front(projection: int, ho: int, wo: int, recomputed: dict | None = None, masked_input: bool = False):
    """A macro ``(c, g, g_mask, w_proj, s_proj, mask, b_scale, g_b, gi, out, border, y)``: channel ``c`` of a 1x1
    projection's input gradient (:func:`.te_backward.conv2d_input_grad`: the sum over the ``projection`` output channels
    of ``g``, in increasing order), masked by the clamp of the conv it reads, into ``out`` inside a border of
    ``border``, and that conv's bias gradient ``g_b[gi] = b_scale[c] * sum(plane)`` (:func:`.te_backward.bias_grad`).
    The mask is bit-packed ``mask``, or, with ``recomputed`` (that conv's quantization), the int8 outputs ``y[0, 0]``
    of channel ``c``.  With ``masked_input`` the output gradient is ``g`` read through the projection's own packed
    clamp mask ``g_mask`` (:func:`.te_backward.apply_mask`'s select, element by element): the same terms, with no
    masked copy of ``g``."""
    px = next(n for n in (8, 4, 2, 1) if wo % n == 0)  # output pixels of a projection row summed together
    recompute = recomputed is not None

    @T.macro
    def front(c, g, g_mask, w_proj, s_proj, mask, b_scale, g_b, gi, out, border, y):
        proj_real = T.alloc_buffer((projection,), "float32", scope="global")  # channel c's real projection weights
        proj_acc = T.alloc_buffer((px,), "float32", scope="global")
        for o in range(projection):
            proj_real[o] = T.Cast("float32", w_proj[o, c, 0, 0]) * s_proj[o]
        for i, jq in T.grid(ho, wo // px):
            for u in T.unroll(px):
                proj_acc[u] = T.float32(0.0)
            for o in range(projection):
                for u in T.unroll(px):
                    if masked_input:
                        proj_acc[u] = proj_acc[u] + T.Select(_bit(g_mask, (o * ho + i) * wo + jq * px + u), g[0, o, i, jq * px + u],
                                                             T.float32(0.0)) * proj_real[o]
                    else:
                        proj_acc[u] = proj_acc[u] + g[0, o, i, jq * px + u] * proj_real[o]
            for u in T.unroll(px):
                if recompute:
                    out[i + border, jq * px + u + border] = T.Select(_unsaturated(y[0, 0, i, jq * px + u], recomputed), proj_acc[u],
                                                                     T.float32(0.0))
                else:
                    out[i + border, jq * px + u + border] = T.Select(_bit(mask, (c * ho + i) * wo + jq * px + u), proj_acc[u],
                                                                     T.float32(0.0))
        g_b[gi] = T.float32(0.0)
        for i, j in T.grid(ho, wo):
            g_b[gi] = g_b[gi] + out[i + border, j + border]
        g_b[gi] = b_scale[c] * g_b[gi]

    return front


@cached_kernel
def projection_bias_grad(channels: int, projection: int, h: int, w: int, masked_input: bool = False):
    """PrimFunc ``(g_out, w_proj, s_proj, mask, b_scale) -> g_b``: the bias gradient of a conv of ``channels`` outputs
    ``h x w`` read by a 1x1 projection of ``projection`` outputs, through the conv's clamp ``mask``, from the
    projection's output gradient: input gradient -> mask -> bias gradient, one channel plane at a time, where the
    backward stops after that bias (the plane of the projection's input gradient is the only workspace).  With
    ``masked_input``, ``g_out`` is read through the projection's packed clamp mask ``g_mask``, an input after it."""
    front = projection_front(projection, h, w, masked_input=masked_input)

    @T.prim_func(private=True)
    def kernel(g_out: T.Buffer((1, projection, h, w), "float32"), g_mask: T.Buffer(((projection * h * w + 7) // 8,), "uint8"),
               w_proj: T.Buffer((projection, channels, 1, 1), "int8"), s_proj: T.Buffer((projection,), "float32"),
               mask: T.Buffer(((channels * h * w + 7) // 8,), "uint8"), b_scale: T.Buffer((channels,), "float32"),
               g_b: T.Buffer((channels,), "float32")):
        plane = T.alloc_buffer((h, w), "float32", scope="global")
        for c in range(channels):
            front(c, g_out, g_mask, w_proj, s_proj, mask, b_scale, g_b, c, plane, 0, None)

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
    once, and reads the output gradient from a copy inside a zero border instead of testing each tap's bounds.
    The terms skipped or read from the border are ``+-0.0``, which change no sum that starts at ``+0.0``: the
    sums are those of the separate kernels.

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
    weight row ``c`` and the biases, which the step updates only after this kernel; ``mask`` and ``mask_dw`` give way
    to ``(b1, m1, s1, b2, m2, s2)`` after ``lr``, the bias, multiplier and shift of the expansion and the depthwise
    conv.

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
    tap_loop = T.unroll if stride == 1 else T.serial  # stride 1: k taps a row, a constant
    expand_q, dw_q, wide_expand, wide_dw = recompute or ({}, {}, False, False)
    # The optimized variant recomputes the expanded plane on the DSP instructions where their shape allows.
    dsp_expand = recompute is not None and current_variant() == "optimized" and tir_expand_depthwise.fits(in_channels, 1, w)
    expand_channel = tir_expand_depthwise.expansion_plane(in_channels, h, w, pad, expand_q, wide_expand) if dsp_expand else None
    dw_channel = tir_depthwise.plane_conv(k, stride, ho, wo, dw_q, wide_dw) if recompute else None
    recompute_masks = recompute is not None
    plane_shape, dw_y_shape = ((h + 2 * pad, w + 2 * pad), (1, 1, ho, wo)) if recompute_masks else ((1, 1), (1, 1, 1, 1))

    front = projection_front(projection or 1, ho, wo, dw_q if recompute_masks else None, masked_front)

    @T.macro
    def recompute_channel(c, x, w_pw, w_dw, b1, m1, s1, b2, m2, s2, plane, dw_y, r_acc, r_start, r_params, r_pairs, r_lanes):
        """Channel ``c``'s expanded plane (inside the depthwise zero border) and depthwise output, as the forward."""
        if dsp_expand:
            pixels = T.decl_buffer((in_channels * h * w,), "int8", data=x.data)
            weight_rows = T.decl_buffer((channels * in_channels,), "int8", data=w_pw.data)
            expand_channel(pixels, weight_rows, b1, m1, s1, c, r_start, r_pairs, r_lanes, r_params, r_acc, plane)
        else:
            for y, xx in T.grid(h, w):
                r_acc[0] = 0
                for i in range(in_channels):
                    r_acc[0] = r_acc[0] + (T.Cast("int32", x[0, i, y, xx]) - trained_x_zero) * T.Cast("int32", w_pw[c, i, 0, 0])
                plane[y + pad, xx + pad] = requantize_value(r_acc[0], b1[c], m1[c], s1[c], expand_q["y_zero"], expand_q["qmin"],
                                                            expand_q["qmax"], wide_expand)
        dw_channel(plane, w_dw, b2, m2, s2, c, r_start, r_params, r_acc, dw_y, 0)

    @T.macro
    def plane_bias_grad(planes, t, b_scale, c, g_b, gi):
        """``g_b[gi]``: channel ``c``'s bias gradient, ``b_scale[c]`` times the sum of its masked plane ``t``."""
        g_b[gi] = T.float32(0.0)
        for y, xx in T.grid(h, w):
            g_b[gi] = g_b[gi] + planes[t, y, xx]
        g_b[gi] = b_scale[c] * g_b[gi]

    @T.macro
    def block_backward(g, g_mask, w_dw, s_dw, mask, b_scale, w_pw, s_pw, x, w_scale, lr, g_x, g_b, w_new, w_proj, s_proj, mask_dw,
                       b_scale_dw, g_b_dw, frozen, b1, m1, s1, b2, m2, s2, b1_new, b2_new):
        planes = T.alloc_buffer((tile, h, w), "float32", scope="global")
        g_pad = T.alloc_buffer((rows, cols), "float32", scope="global")  # channel c's output gradient in a zero border
        dw_real = T.alloc_buffer((k, k), "float32", scope="global")  # channel c's real depthwise weights
        pw_real = T.alloc_buffer((pair, tile), "float32", scope="global")  # the pair's real expansion weights in the tile
        acc = T.alloc_buffer((pair_w, tile), "float32", scope="global")
        two = T.alloc_buffer((max(pair, pair_w),), "float32", scope="global")  # elements of g_x, or input values
        # Recomputed masks: channel c's expanded plane in the depthwise zero border, and its depthwise output.
        plane = T.alloc_buffer(plane_shape, "int8", scope="global")
        dw_y = T.alloc_buffer(dw_y_shape, "int8", scope="global")
        r_acc = T.alloc_buffer((4,), "int32", scope="global")
        r_start = T.alloc_buffer((1,), "int32", scope="global")
        r_params = T.alloc_buffer((3,), "int32", scope="global")
        r_pairs = T.alloc_buffer((2,), "int32", scope="global")
        r_lanes = T.alloc_buffer((4,), "int32", scope="global")
        g_bias = T.alloc_buffer((2,), "float32", scope="global")  # update_biases: channel c's two bias gradients
        if input_grad:
            for ci, y, xx in T.grid(in_channels, h, w):
                g_x[0, ci, y, xx] = T.float32(0.0)
        for i, j in T.grid(rows, cols):  # the border; each channel overwrites the inside
            g_pad[i, j] = T.float32(0.0)
        if recompute_masks:
            for i, j in T.grid(h + 2 * pad, w + 2 * pad):
                plane[i, j] = T.int8(dw_q["x_zero"])
        for c0 in range(channels // tile):
            for t in range(tile):  # the depthwise input gradient of channel c, masked by the expansion's clamp
                if recompute_masks:
                    recompute_channel(c0 * tile + t, x, w_pw, w_dw, b1, m1, s1, b2, m2, s2, plane, dw_y, r_acc, r_start, r_params,
                                      r_pairs, r_lanes)
                for rh, rw in T.grid(k, k):
                    dw_real[rh, rw] = T.Cast("float32", w_dw[c0 * tile + t, 0, rh, rw]) * s_dw[c0 * tile + t]
                if projection is None:
                    for i, j in T.grid(ho, wo):
                        g_pad[i + taps - 1, j + taps - 1] = g[0, c0 * tile + t, i, j]
                else:  # g is the projection's output gradient: channel c's input gradient, masked by the depthwise clamp
                    if update_biases:
                        front(c0 * tile + t, g, g_mask, w_proj, s_proj, mask_dw, b_scale_dw, g_bias, 1, g_pad, taps - 1, dw_y)
                        b2_new[c0 * tile + t] = int32_step(b2[c0 * tile + t], lr, g_bias[1])
                    else:
                        front(c0 * tile + t, g, g_mask, w_proj, s_proj, mask_dw, b_scale_dw, g_b_dw, c0 * tile + t, g_pad, taps - 1,
                              dw_y)
                for y, xx in T.grid(h, w):
                    planes[t, y, xx] = T.float32(0.0)
                    # Taps kh = (y + pad) % stride + stride * jh < k, in increasing order, read output row
                    # (y + pad) // stride - jh; the border stands for the rows outside the output.
                    for jh in range((k - (y + pad) % stride + stride - 1) // stride):
                        for jw in tap_loop((k - (xx + pad) % stride + stride - 1) // stride):
                            planes[t, y, xx] = planes[t, y, xx] + (
                                g_pad[(y + pad) // stride - jh + taps - 1, (xx + pad) // stride - jw + taps - 1]
                                * dw_real[(y + pad) % stride + stride * jh, (xx + pad) % stride + stride * jw])
                    if recompute_masks:
                        planes[t, y, xx] = T.Select(_unsaturated(plane[y + pad, xx + pad], expand_q), planes[t, y, xx], T.float32(0.0))
                    else:
                        planes[t, y, xx] = T.Select(_bit(mask, ((c0 * tile + t) * h + y) * w + xx), planes[t, y, xx], T.float32(0.0))
                if update_biases:
                    plane_bias_grad(planes, t, b_scale, c0 * tile + t, g_bias, 0)
                    b1_new[c0 * tile + t] = int32_step(b1[c0 * tile + t], lr, g_bias[0])
                else:
                    plane_bias_grad(planes, t, b_scale, c0 * tile + t, g_b, c0 * tile + t)
            if input_grad:
                for ci2 in range(in_channels // pair):
                    for s, t in T.grid(pair, tile):
                        if merged is None:
                            pw_real[s, t] = T.Cast("float32", w_pw[c0 * tile + t, ci2 * pair + s, 0, 0]) * s_pw[c0 * tile + t]
                        else:  # the merge: the trained slice's column where the channel has one, else the frozen weight (lazy)
                            pw_real[s, t] = T.Cast("float32", T.if_then_else(
                                static_index(ci2 * pair + s, slot) >= 0, w_pw[c0 * tile + t, static_index(ci2 * pair + s, slot), 0, 0],
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


def _signature(func: tirx.PrimFunc, names: list[str]) -> tirx.PrimFunc:
    """``func`` with only the buffer parameters ``names``, in that order (the body must not touch the others)."""
    by_name = {p.name: p for p in func.params}
    return tirx.PrimFunc([by_name[n] for n in names], func.body, func.ret_type, func.attrs)
