"""A conv (groups 1) with its requantization as a blocked int8 GEMM on the DSP instructions, in TIR.

A conv is ``y[oc, p] = requant(sum_r w[oc, r] * col[r, p])`` over the ``R = ic * k * k`` taps ``r = (ic, kh, kw)``
of output pixel ``p``, ``col`` being the input under the tap minus the zero point (0 in the padding).  ``SMLAD``
does two of those multiply-adds in one instruction on pairs of halfwords taken along ``r``.  A weight row gives
its pairs straight from memory: one 32-bit load of ``w[oc, 4g:4g+4]`` and two ``SXTB16`` give
``(w[4g], w[4g+2])`` and ``(w[4g+1], w[4g+3])``.  For each tile of four output pixels along a row (two where
the row or the staged bytes do not allow four) the kernel first stages their columns as halfword pairs in that
same order (``2 * R`` bytes per pixel, written once and read by every output channel); it then computes 2 output
channels x the tile's pixels at a time, up to eight accumulators in registers, two ``SMLAD`` per accumulator per
four taps: each weight pair loaded, and each channel's requantization parameters, serve the whole tile.  When
``R`` is not a multiple of four (the first conv: 3 channels x 3 x 3) the weight rows are first copied,
zero-padded to whole groups, to the stack.  A 1x1 conv's taps are its input channels and its columns need no
bounds checks.  The schedule TE would give cannot express the staging's pair order or the 32-bit weight loads,
hence TIR.

The sums are integer and do not overflow (``|w * (x - x_zero)| <= 128 * 255``), so the order of the terms
does not matter: the outputs are the bits of :func:`.te_kernels.conv2d_acc` then
:func:`.te_kernels.requantize`.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from . import dsp, tir_depthwise
from .schedule import cached_kernel
from .te_backward import static_index

MAX_STAGED_WEIGHT_BYTES = 2048  # weight rows copied to the stack when R is not a multiple of 4
FOUR_PIXEL_COLUMN_BYTES = 1024  # the most staged columns that take four pixels at a time (beyond: two, half the bytes)


def fits(in_channels: int, out_channels: int, batch: int, out_width: int, k: int = 1, merged: bool = False) -> bool:
    """Whether :func:`conv_requant` takes this conv (groups 1): pixels in pairs along a row, channels in pairs,
    the weight rows whole groups of four taps or small enough to stage; a merged weight only for 1x1."""
    taps = in_channels * k * k
    staged = taps % 4 != 0
    return (batch == 1 and out_channels % 2 == 0 and out_width % 2 == 0 and not (merged and k != 1)
            and (not staged or out_channels * (taps + 3) // 4 * 4 <= MAX_STAGED_WEIGHT_BYTES))


@cached_kernel
def conv_requant(in_channels: int, out_channels: int, h: int, w: int, k: int, stride: int, x_zero: int, y_zero: int,
                 qmin: int, qmax: int, wide_shift: bool, trained_channels: tuple[int, ...] = (), pad_h: int | None = None):
    """PrimFunc ``(x, w, bias, mult, shift) -> y`` of a conv (padding ``(k-1)//2``, rows ``pad_h`` when given) then
    requantize (module doc).

    With ``trained_channels`` (1x1 only) the weight is SparseUpdate's merged one and the PrimFunc is
    ``(x, frozen, trained, bias, mult, shift) -> y``: ``trained[:, j]`` replaces input channel
    ``trained_channels[j]`` of ``frozen``.  The GEMM runs on ``frozen`` whole, and each accumulator then gets
    ``(trained[o, j] - frozen[o, c_j]) * (x[c_j] - x_zero)``: the same integer sum, without a per-weight choice
    between the two tensors in the inner loop.  Both factors fit a halfword, so two trained columns take one
    ``SMLAD``, against their input pairs staged once per tile of pixels (``px`` x half the trained columns, int32).
    """
    ic, oc, n_trained = in_channels, out_channels, len(trained_channels)
    pad = (k - 1) // 2
    pad_h = pad if pad_h is None else pad_h
    ho, wo = (h + 2 * pad_h - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    taps = ic * k * k
    groups = (taps + 3) // 4
    staged = taps % 4 != 0

    def column(x, r, oh, ow):
        """Tap ``r`` of output pixel ``(oh, ow)``: ``x - x_zero`` under it, 0 in the padding and past the last tap."""
        if k == 1 and stride == 1 and not staged:
            return x[0, r, oh, ow].astype("int32") - x_zero
        c, kh, kw = r // (k * k), r // k % k, r % k
        ih, iw = oh * stride + kh - pad_h, ow * stride + kw - pad
        inside = tirx.all(r < taps, ih >= 0, ih < h, iw >= 0, iw < w)
        return tirx.if_then_else(inside, x[0, c, ih, iw].astype("int32") - x_zero, 0)

    # A short staging loop is unrolled, so each tap's (channel, kh, kw) is a constant: no divisions per pixel.
    staging_loop = T.unroll if k > 1 and groups <= 16 else T.serial
    group_loop = T.unroll if groups <= 4 else T.serial  # a short GEMM loop's set-up would cost as much as its body
    # A long GEMM loop takes up to four groups per iteration: its counter and branch cost a tenth of one group's body.
    step = next(s for s in (4, 2, 1) if groups % s == 0) if groups > 4 else 1
    # Output pixels per weight pair loaded: four share each weight load and channel's requantization set-up, but
    # their columns take twice the bytes, which beyond a C local would be arena workspace.
    px = 4 if wo % 4 == 0 and 4 * groups * 8 <= FOUR_PIXEL_COLUMN_BYTES else 2
    # A 1x1 conv's four pixels of a channel are one 32-bit load: two rows' loads give the four pixels' pairs (as in
    # :mod:`.tir_expand_depthwise`), and one SSUB16 subtracts the zero point from both halves of a pair.
    packed_staging = k == 1 and stride == 1 and not staged and px == 4  # whole groups: no load past the last channel
    # A 1x1 conv of at most 8 input channels holds each output channel's weight pairs in registers instead, across a
    # whole row of staged columns: a tile's 8 accumulators, 4 weight pairs and the requantization would leave its
    # columns to be reloaded from the stack for each use, and few taps share that set-up (measured: 13 % fewer
    # instructions for MCUNet's 8 -> 32 expansion at 64x64; none for 16 input channels, whose weights spill).
    stationary = (k == 1 and stride == 1 and not staged and n_trained == 0 and groups <= 2
                  and wo * groups * 8 <= FOUR_PIXEL_COLUMN_BYTES)
    zero_pair = (x_zero & 0xFFFF) | ((x_zero & 0xFFFF) << 16)  # (x_zero, x_zero) as halfwords of one int32
    zero_pair = zero_pair - (1 << 32) if zero_pair >= 1 << 31 else zero_pair

    def trained_x(x, j, oh, p):
        """``x - x_zero`` of pixel ``(oh, p)`` at trained column ``j`` (a constant once unrolled)."""
        return T.Cast("int32", x[0, static_index(j, trained_channels), oh, p]) - x_zero

    def weight_change(flat, trained, o, j):
        """``trained - frozen`` of output channel ``o`` at trained column ``j``: within [-255, 255], one halfword."""
        return T.Cast("int32", trained[o, j, 0, 0]) - T.Cast("int32", flat[o * taps + static_index(j, trained_channels)])

    n_trained_pairs = n_trained // 2

    quant = {"y_zero": y_zero, "qmin": qmin, "qmax": qmax}

    def taps_side_by_side(pixels, oh, q, g, half, j: int):
        """Pixels ``4q + j - j % 2`` and the next of taps ``4g + half`` and ``4g + half + 2`` (1x1, stride 1)."""
        return dsp.rows_side_by_side(dsp.load_i32(pixels[((4 * g + half) * h + oh) * w + 4 * q]),
                                     dsp.load_i32(pixels[((4 * g + half + 2) * h + oh) * w + 4 * q]), j)

    @T.macro
    def stage_quad(pixels, oh, q, g, out, at, two):
        """``out[at + j, 2g + half]``: the pairs of pixels ``4q .. 4q + 3`` minus the zero point, from one 32-bit load of
        four pixels per input channel."""
        for half in T.unroll(2):
            two[0] = taps_side_by_side(pixels, oh, q, g, half, 0)
            two[1] = taps_side_by_side(pixels, oh, q, g, half, 2)
            out[at, 2 * g + half] = dsp.ssub16(dsp.column_of(two[0], 0), zero_pair)
            out[at + 1, 2 * g + half] = dsp.ssub16(dsp.column_of(two[0], 1), zero_pair)
            out[at + 2, 2 * g + half] = dsp.ssub16(dsp.column_of(two[1], 2), zero_pair)
            out[at + 3, 2 * g + half] = dsp.ssub16(dsp.column_of(two[1], 3), zero_pair)

    @T.macro
    def weight_stationary(x, flat, bias, mult, shift, y, pixels, col, acc, pairs, params, two):
        """A row's columns staged, then one output channel at a time: its weight pairs loaded once for the row."""
        for oh in range(ho):
            for g in T.unroll(groups):
                if wo % 4 == 0:
                    for q in range(wo // 4):
                        stage_quad(pixels, oh, q, g, col, 4 * q, two)
                else:
                    for p, half in T.grid(wo, 2):
                        col[p, 2 * g + half] = dsp.pack16(column(x, 4 * g + half, oh, p), column(x, 4 * g + half + 2, oh, p))
            for o in range(oc):
                for g in T.unroll(groups):
                    pairs[2 * g] = dsp.sxtb16(dsp.load_i32(flat[o * taps + 4 * g]))
                    pairs[2 * g + 1] = dsp.sxtb16_ror8(dsp.load_i32(flat[o * taps + 4 * g]))
                tir_depthwise.copy_channel_params(params, bias, mult, shift, o, 0)
                for p in range(wo):
                    acc[0] = 0
                    for g in T.unroll(groups):
                        acc[0] = dsp.smlad(pairs[2 * g + 1], col[p, 2 * g + 1], dsp.smlad(pairs[2 * g], col[p, 2 * g], acc[0]))
                    y[0, o, oh, p] = tir_depthwise.requantized(acc[0], params, quant, wide_shift)

    @T.macro
    def pixel_tiles(x, flat, rows, trained, bias, mult, shift, y, pixels, col, acc, pairs, params0, params1, two, trained_col):
        """Tiles of 2 output channels x ``px`` pixels: the tile's columns staged, then every channel pair over them."""
        for oh, cp in T.grid(ho, wo // px):
            for g in staging_loop(groups):
                if packed_staging:
                    stage_quad(pixels, oh, cp, g, col, 0, two)
                else:
                    for j in T.unroll(px):
                        for half in T.unroll(2):
                            col[j, 2 * g + half] = dsp.pack16(column(x, 4 * g + half, oh, px * cp + j),
                                                              column(x, 4 * g + half + 2, oh, px * cp + j))
            if n_trained_pairs > 0:
                for j in T.unroll(px):  # the trained columns' input pairs, for every channel pair
                    for i in T.unroll(n_trained_pairs):
                        trained_col[j, i] = dsp.pack16(trained_x(x, 2 * i, oh, px * cp + j), trained_x(x, 2 * i + 1, oh, px * cp + j))
            for o2 in range(oc // 2):
                for t in T.unroll(2 * px):
                    acc[t] = 0
                for g_step in group_loop(groups // step):
                    for g_in in T.unroll(step):
                        for c in T.unroll(2):  # the C compiler merges each row's two loads into one
                            if staged:
                                pairs[2 * c] = dsp.sxtb16(dsp.load_i32(rows[((2 * o2 + c) * groups + g_step * step + g_in) * 4]))
                                pairs[2 * c + 1] = dsp.sxtb16_ror8(dsp.load_i32(rows[((2 * o2 + c) * groups + g_step * step + g_in) * 4]))
                            else:
                                pairs[2 * c] = dsp.sxtb16(dsp.load_i32(flat[(2 * o2 + c) * taps + 4 * (g_step * step + g_in)]))
                                pairs[2 * c + 1] = dsp.sxtb16_ror8(dsp.load_i32(flat[(2 * o2 + c) * taps + 4 * (g_step * step + g_in)]))
                        for t in T.unroll(2 * px):
                            acc[t] = dsp.smlad(pairs[t // px * 2 + 1], col[t % px, 2 * (g_step * step + g_in) + 1],
                                               dsp.smlad(pairs[t // px * 2], col[t % px, 2 * (g_step * step + g_in)], acc[t]))
                tir_depthwise.copy_channel_params(params0, bias, mult, shift, 2 * o2, 0)
                tir_depthwise.copy_channel_params(params1, bias, mult, shift, 2 * o2 + 1, 0)
                # The merge: (trained - frozen) * (x - x_zero) added for each trained column, two columns per SMLAD.
                if n_trained_pairs > 0:
                    # unrolled: each trained column's input channel a constant (a loop would look it up per channel pair)
                    for i in T.unroll(n_trained_pairs):
                        for c in T.unroll(2):
                            pairs[c] = dsp.pack16(weight_change(flat, trained, 2 * o2 + c, 2 * i),
                                                  weight_change(flat, trained, 2 * o2 + c, 2 * i + 1))
                        for t in T.unroll(2 * px):
                            acc[t] = dsp.smlad(pairs[t // px], trained_col[t % px, i], acc[t])
                if n_trained % 2 == 1:
                    for t in T.unroll(2 * px):
                        acc[t] = acc[t] + weight_change(flat, trained, 2 * o2 + t // px, n_trained - 1) * trained_x(x, n_trained - 1, oh, px * cp + t % px)
                for j in T.unroll(px):
                    y[0, 2 * o2, oh, px * cp + j] = tir_depthwise.requantized(acc[j], params0, quant, wide_shift)
                for j in T.unroll(px):
                    y[0, 2 * o2 + 1, oh, px * cp + j] = tir_depthwise.requantized(acc[px + j], params1, quant, wide_shift)

    @T.macro
    def gemm(x, wt, trained, bias, mult, shift, y):
        flat = T.decl_buffer((oc * taps,), "int8", data=wt.data)
        rows = T.alloc_buffer((oc * groups * 4 if staged else 1,), "int8", scope="global")  # the staged weight rows
        # [pixel][pair]: (4g, 4g+2), (4g+1, 4g+3) of the tile's pixels, or of the whole row's
        col = T.alloc_buffer((wo if stationary else px, groups * 2), "int32", scope="global")
        acc = T.alloc_buffer((2 * px,), "int32", scope="global")  # [channel * px + pixel]
        # weight pairs (4g+k, 4g+k+2): [channel * 2 + k] of the tile's two channels, or [2g + k] of one channel's row
        pairs = T.alloc_buffer((2 * groups if stationary else 4,), "int32", scope="global")
        # Each channel of the pair's bias, multiplier and shift in locals (as :mod:`.tir_depthwise` does): loaded
        # once for its outputs (from the arguments the C compiler reloads them after every int8 store).
        params0 = T.alloc_buffer((3,), "int32", scope="global")
        params1 = T.alloc_buffer((3,), "int32", scope="global")
        two = T.alloc_buffer((2,), "int32", scope="global")  # packed staging: two rows' halfwords side by side
        trained_col = T.alloc_buffer((px, max(1, n_trained_pairs)), "int32", scope="global")  # [pixel][trained column pair]
        pixels = T.decl_buffer((ic * h * w,), "int8", data=x.data)
        if staged:
            for o, r in T.grid(oc, groups * 4):
                rows[o * groups * 4 + r] = T.if_then_else(r < taps, flat[o * taps + T.min(r, taps - 1)], T.int8(0))
        if stationary:
            weight_stationary(x, flat, bias, mult, shift, y, pixels, col, acc, pairs, params0, two)
        else:
            pixel_tiles(x, flat, rows, trained, bias, mult, shift, y, pixels, col, acc, pairs, params0, params1, two, trained_col)

    if n_trained:
        @T.prim_func(private=True)
        def merged(x: T.Buffer((1, ic, h, w), "int8"), frozen: T.Buffer((oc, ic, 1, 1), "int8"),
                   trained: T.Buffer((oc, n_trained, 1, 1), "int8"), bias: T.Buffer((oc,), "int32"),
                   mult: T.Buffer((oc,), "int32"), shift: T.Buffer((oc,), "int32"), y: T.Buffer((1, oc, h, w), "int8")):
            gemm(x, frozen, trained, bias, mult, shift, y)

        return merged

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((1, ic, h, w), "int8"), wt: T.Buffer((oc, ic, k, k), "int8"), bias: T.Buffer((oc,), "int32"),
               mult: T.Buffer((oc,), "int32"), shift: T.Buffer((oc,), "int32"), y: T.Buffer((1, oc, ho, wo), "int8")):
        gemm(x, wt, None, bias, mult, shift, y)

    return kernel
