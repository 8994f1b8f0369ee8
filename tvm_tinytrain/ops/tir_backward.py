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

from tvm.script import tirx as T

from ..errors import TinyTrainError
from .te_backward import int8_step, static_index


def depthwise_block_backward(channels: int, in_channels: int, h: int, w: int, ho: int, wo: int, k: int, stride: int,
                             trained_x_zero: int | None = None, tile: int = 1, projection: int | None = None,
                             merged: tuple[int, ...] | None = None):
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
    ``(w_pw, g, w_dw, s_dw, mask, b_scale, s_pw, x, w_scale, lr) -> (g_x, g_b, w_new)`` also applies its SGD step
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
    """
    if merged is not None and trained_x_zero is None:
        raise TinyTrainError("depthwise_block_backward: a merged expansion weight is a trained one (give trained_x_zero)")
    if tile < 1 or channels % tile:
        raise TinyTrainError(f"depthwise_block_backward: tile {tile} does not divide {channels} channels")
    pad = (k - 1) // 2
    taps = -(-k // stride)  # the most taps of one parity along an axis
    rows, cols = (h - 1 + pad) // stride + taps, (w - 1 + pad) // stride + taps
    mask_bytes = (channels * h * w + 7) // 8
    mask_dw_bytes = (channels * ho * wo + 7) // 8
    px = next(n for n in (8, 4, 2, 1) if wo % n == 0)  # output pixels of a projection row summed together
    pair = 2 if in_channels % 2 == 0 else 1  # expansion input channels taken together: each plane load serves both
    n_w = in_channels if merged is None else len(merged)  # input channels of the trained weight, and of x
    pair_w = 2 if n_w % 2 == 0 else 1
    slot = [-1] * in_channels  # each input channel's column in the trained slice, -1: frozen
    for j, ch in enumerate(merged or range(in_channels)):
        slot[ch] = j
    tap_loop = T.unroll if stride == 1 else T.serial  # stride 1: k taps a row, a constant

    @T.macro
    def block_backward(g, w_dw, s_dw, mask, b_scale, w_pw, s_pw, x, w_scale, lr, g_x, g_b, w_new, w_proj, s_proj, mask_dw,
                       b_scale_dw, g_b_dw, frozen):
        planes = T.alloc_buffer((tile, h, w), "float32", scope="global")
        g_pad = T.alloc_buffer((rows, cols), "float32", scope="global")  # channel c's output gradient in a zero border
        dw_real = T.alloc_buffer((k, k), "float32", scope="global")  # channel c's real depthwise weights
        pw_real = T.alloc_buffer((pair, tile), "float32", scope="global")  # the pair's real expansion weights in the tile
        acc = T.alloc_buffer((pair_w, tile), "float32", scope="global")
        two = T.alloc_buffer((max(pair, pair_w),), "float32", scope="global")  # elements of g_x, or input values
        for ci, y, xx in T.grid(in_channels, h, w):
            g_x[0, ci, y, xx] = T.float32(0.0)
        for i, j in T.grid(rows, cols):  # the border; each channel overwrites the inside
            g_pad[i, j] = T.float32(0.0)
        for c0 in range(channels // tile):
            for t in range(tile):  # the depthwise input gradient of channel c, masked by the expansion's clamp
                for rh, rw in T.grid(k, k):
                    dw_real[rh, rw] = T.Cast("float32", w_dw[c0 * tile + t, 0, rh, rw]) * s_dw[c0 * tile + t]
                if projection is None:
                    for i, j in T.grid(ho, wo):
                        g_pad[i + taps - 1, j + taps - 1] = g[0, c0 * tile + t, i, j]
                else:  # g is the projection's output gradient: channel c's input gradient, masked by the depthwise clamp
                    proj_real = T.alloc_buffer((projection,), "float32", scope="global")  # channel c's real projection weights
                    proj_acc = T.alloc_buffer((px,), "float32", scope="global")
                    for o in range(projection):
                        proj_real[o] = T.Cast("float32", w_proj[o, c0 * tile + t, 0, 0]) * s_proj[o]
                    for i, jq in T.grid(ho, wo // px):
                        for u in T.unroll(px):
                            proj_acc[u] = T.float32(0.0)
                        for o in range(projection):
                            for u in T.unroll(px):
                                proj_acc[u] = proj_acc[u] + g[0, o, i, jq * px + u] * proj_real[o]
                        for u in T.unroll(px):
                            g_pad[i + taps - 1, jq * px + u + taps - 1] = T.Select(
                                T.bitwise_and(T.shift_right(mask_dw[(((c0 * tile + t) * ho + i) * wo + jq * px + u) // 8],
                                                            T.Cast("uint8", (((c0 * tile + t) * ho + i) * wo + jq * px + u) % 8)), T.uint8(1))
                                != T.uint8(0), proj_acc[u], T.float32(0.0))
                    g_b_dw[c0 * tile + t] = T.float32(0.0)
                    for i, j in T.grid(ho, wo):
                        g_b_dw[c0 * tile + t] = g_b_dw[c0 * tile + t] + g_pad[i + taps - 1, j + taps - 1]
                    g_b_dw[c0 * tile + t] = b_scale_dw[c0 * tile + t] * g_b_dw[c0 * tile + t]
                for y, xx in T.grid(h, w):
                    planes[t, y, xx] = T.float32(0.0)
                    # Taps kh = (y + pad) % stride + stride * jh < k, in increasing order, read output row
                    # (y + pad) // stride - jh; the border stands for the rows outside the output.
                    for jh in range((k - (y + pad) % stride + stride - 1) // stride):
                        for jw in tap_loop((k - (xx + pad) % stride + stride - 1) // stride):
                            planes[t, y, xx] = planes[t, y, xx] + (
                                g_pad[(y + pad) // stride - jh + taps - 1, (xx + pad) // stride - jw + taps - 1]
                                * dw_real[(y + pad) % stride + stride * jh, (xx + pad) % stride + stride * jw])
                    planes[t, y, xx] = T.Select(
                        T.bitwise_and(T.shift_right(mask[(((c0 * tile + t) * h + y) * w + xx) // 8],
                                                    T.Cast("uint8", (((c0 * tile + t) * h + y) * w + xx) % 8)), T.uint8(1))
                        != T.uint8(0), planes[t, y, xx], T.float32(0.0))
                g_b[c0 * tile + t] = T.float32(0.0)
                for y, xx in T.grid(h, w):
                    g_b[c0 * tile + t] = g_b[c0 * tile + t] + planes[t, y, xx]
                g_b[c0 * tile + t] = b_scale[c0 * tile + t] * g_b[c0 * tile + t]
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

    # One PrimFunc per signature: the buffers of the projection's front replace ``g`` and add ``g_b_dw``; a merged
    # expansion adds its frozen weight.
    if trained_x_zero is not None and projection is not None and merged is not None:
        @T.prim_func(private=True)
        def merged_from_projection(
                w_pw: T.Buffer((channels, n_w, 1, 1), "int8"), g_out: T.Buffer((1, projection, ho, wo), "float32"),
                w_proj: T.Buffer((projection, channels, 1, 1), "int8"), s_proj: T.Buffer((projection,), "float32"),
                mask_dw: T.Buffer((mask_dw_bytes,), "uint8"), b_scale_dw: T.Buffer((channels,), "float32"),
                w_dw: T.Buffer((channels, 1, k, k), "int8"), s_dw: T.Buffer((channels,), "float32"), mask: T.Buffer((mask_bytes,), "uint8"),
                b_scale: T.Buffer((channels,), "float32"), s_pw: T.Buffer((channels,), "float32"),
                x: T.Buffer((1, n_w, h, w), "int8"), w_scale: T.Buffer((channels,), "float32"), lr: T.Buffer((1,), "float32"),
                frozen: T.Buffer((channels, in_channels, 1, 1), "int8"),
                g_x: T.Buffer((1, in_channels, h, w), "float32"), g_b: T.Buffer((channels,), "float32"),
                w_new: T.Buffer((channels, n_w, 1, 1), "int8"), g_b_dw: T.Buffer((channels,), "float32")):
            block_backward(g_out, w_dw, s_dw, mask, b_scale, w_pw, s_pw, x, w_scale, lr, g_x, g_b, w_new, w_proj, s_proj, mask_dw,
                           b_scale_dw, g_b_dw, frozen)

        return merged_from_projection

    if trained_x_zero is not None and merged is not None:
        @T.prim_func(private=True)
        def trained_merged(w_pw: T.Buffer((channels, n_w, 1, 1), "int8"), g: T.Buffer((1, channels, ho, wo), "float32"),
                           w_dw: T.Buffer((channels, 1, k, k), "int8"), s_dw: T.Buffer((channels,), "float32"),
                           mask: T.Buffer((mask_bytes,), "uint8"), b_scale: T.Buffer((channels,), "float32"),
                           s_pw: T.Buffer((channels,), "float32"), x: T.Buffer((1, n_w, h, w), "int8"),
                           w_scale: T.Buffer((channels,), "float32"), lr: T.Buffer((1,), "float32"),
                           frozen: T.Buffer((channels, in_channels, 1, 1), "int8"),
                           g_x: T.Buffer((1, in_channels, h, w), "float32"), g_b: T.Buffer((channels,), "float32"),
                           w_new: T.Buffer((channels, n_w, 1, 1), "int8")):
            block_backward(g, w_dw, s_dw, mask, b_scale, w_pw, s_pw, x, w_scale, lr, g_x, g_b, w_new, None, None, None, None, None,
                           frozen)

        return trained_merged

    if trained_x_zero is not None and projection is not None:
        @T.prim_func(private=True)
        def trained_from_projection(
                w_pw: T.Buffer((channels, in_channels, 1, 1), "int8"), g_out: T.Buffer((1, projection, ho, wo), "float32"),
                w_proj: T.Buffer((projection, channels, 1, 1), "int8"), s_proj: T.Buffer((projection,), "float32"),
                mask_dw: T.Buffer((mask_dw_bytes,), "uint8"), b_scale_dw: T.Buffer((channels,), "float32"),
                w_dw: T.Buffer((channels, 1, k, k), "int8"), s_dw: T.Buffer((channels,), "float32"), mask: T.Buffer((mask_bytes,), "uint8"),
                b_scale: T.Buffer((channels,), "float32"), s_pw: T.Buffer((channels,), "float32"),
                x: T.Buffer((1, in_channels, h, w), "int8"), w_scale: T.Buffer((channels,), "float32"), lr: T.Buffer((1,), "float32"),
                g_x: T.Buffer((1, in_channels, h, w), "float32"), g_b: T.Buffer((channels,), "float32"),
                w_new: T.Buffer((channels, in_channels, 1, 1), "int8"), g_b_dw: T.Buffer((channels,), "float32")):
            block_backward(g_out, w_dw, s_dw, mask, b_scale, w_pw, s_pw, x, w_scale, lr, g_x, g_b, w_new, w_proj, s_proj, mask_dw,
                           b_scale_dw, g_b_dw, None)

        return trained_from_projection

    if projection is not None:
        @T.prim_func(private=True)
        def from_projection(
                g_out: T.Buffer((1, projection, ho, wo), "float32"), w_proj: T.Buffer((projection, channels, 1, 1), "int8"),
                s_proj: T.Buffer((projection,), "float32"), mask_dw: T.Buffer((mask_dw_bytes,), "uint8"),
                b_scale_dw: T.Buffer((channels,), "float32"), w_dw: T.Buffer((channels, 1, k, k), "int8"),
                s_dw: T.Buffer((channels,), "float32"), mask: T.Buffer((mask_bytes,), "uint8"), b_scale: T.Buffer((channels,), "float32"),
                w_pw: T.Buffer((channels, in_channels, 1, 1), "int8"), s_pw: T.Buffer((channels,), "float32"),
                g_x: T.Buffer((1, in_channels, h, w), "float32"), g_b: T.Buffer((channels,), "float32"),
                g_b_dw: T.Buffer((channels,), "float32")):
            block_backward(g_out, w_dw, s_dw, mask, b_scale, w_pw, s_pw, None, None, None, g_x, g_b, None, w_proj, s_proj, mask_dw,
                           b_scale_dw, g_b_dw, None)

        return from_projection

    if trained_x_zero is not None:
        @T.prim_func(private=True)
        def trained(w_pw: T.Buffer((channels, in_channels, 1, 1), "int8"), g: T.Buffer((1, channels, ho, wo), "float32"),
                    w_dw: T.Buffer((channels, 1, k, k), "int8"), s_dw: T.Buffer((channels,), "float32"), mask: T.Buffer((mask_bytes,), "uint8"),
                    b_scale: T.Buffer((channels,), "float32"), s_pw: T.Buffer((channels,), "float32"),
                    x: T.Buffer((1, in_channels, h, w), "int8"), w_scale: T.Buffer((channels,), "float32"), lr: T.Buffer((1,), "float32"),
                    g_x: T.Buffer((1, in_channels, h, w), "float32"), g_b: T.Buffer((channels,), "float32"),
                    w_new: T.Buffer((channels, in_channels, 1, 1), "int8")):
            block_backward(g, w_dw, s_dw, mask, b_scale, w_pw, s_pw, x, w_scale, lr, g_x, g_b, w_new, None, None, None, None, None, None)

        return trained

    @T.prim_func(private=True)
    def kernel(g: T.Buffer((1, channels, ho, wo), "float32"), w_dw: T.Buffer((channels, 1, k, k), "int8"),
               s_dw: T.Buffer((channels,), "float32"), mask: T.Buffer((mask_bytes,), "uint8"), b_scale: T.Buffer((channels,), "float32"),
               w_pw: T.Buffer((channels, in_channels, 1, 1), "int8"), s_pw: T.Buffer((channels,), "float32"),
               g_x: T.Buffer((1, in_channels, h, w), "float32"), g_b: T.Buffer((channels,), "float32")):
        block_backward(g, w_dw, s_dw, mask, b_scale, w_pw, s_pw, None, None, None, g_x, g_b, None, None, None, None, None, None, None)

    return kernel
