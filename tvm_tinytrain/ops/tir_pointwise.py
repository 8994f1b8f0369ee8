"""The pointwise (1x1) conv with its requantization as a blocked int8 GEMM on the DSP instructions, in TIR.

In NCHW a 1x1 conv is ``y[oc, p] = requant(sum_ic w[oc, ic] * (x[ic, p] - x_zero))``.  ``SMLAD`` does two of
those multiply-adds in one instruction on pairs of halfwords taken along the reduction axis.  A weight row
gives its pairs straight from memory: one 32-bit load of ``w[oc, 4g:4g+4]`` and two ``SXTB16`` give
``(w[4g], w[4g+2])`` and ``(w[4g+1], w[4g+3])``.  The input's channels are a plane apart, so for each pair of
output pixels the kernel first stages their input columns, zero point subtracted, as halfword pairs in that
same order (``4 * ic`` bytes on the stack, written once and read by every output channel); it then computes
2 output channels x 2 pixels at a time, four accumulators in registers, two ``SMLAD`` per accumulator per
four input channels.  The schedule TE would give cannot express the staging's pair order or the 32-bit weight
loads, hence TIR.

The sums are integer and do not overflow (``|w * (x - x_zero)| <= 128 * 255``), so the order of the terms
does not matter: the outputs are the bits of :func:`.te_kernels.conv2d_acc` then
:func:`.te_kernels.requantize`.
"""

from __future__ import annotations

from tvm.script import tirx as T

from . import dsp
from .te_kernels import clamp_int8, scale_shift


def fits(in_channels: int, out_channels: int, batch: int, width: int) -> bool:
    """Whether :func:`pointwise_conv_requant` takes this 1x1 conv (stride 1, groups 1)."""
    return batch == 1 and in_channels % 4 == 0 and out_channels % 2 == 0 and width % 2 == 0


def pointwise_conv_requant(in_channels: int, out_channels: int, h: int, w: int, x_zero: int, y_zero: int,
                           qmin: int, qmax: int, wide_shift: bool, trained_channels: tuple[int, ...] = ()):
    """PrimFunc ``(x, w, bias, mult, shift) -> y`` of a 1x1 conv then requantize (see the module doc).

    With ``trained_channels`` the weight is SparseUpdate's merged one and the PrimFunc is
    ``(x, frozen, trained, bias, mult, shift) -> y``: ``trained[:, j]`` replaces input channel
    ``trained_channels[j]`` of ``frozen``.  The GEMM runs on ``frozen`` whole, and each accumulator then gets
    ``(trained[o, j] - frozen[o, c_j]) * (x[c_j] - x_zero)``: the same integer sum, without a per-weight choice
    between the two tensors in the inner loop.
    """
    ic, oc, n_trained = in_channels, out_channels, len(trained_channels)

    def corrected(acc, c, x, frozen, trained, r, px):
        for j, ch in enumerate(trained_channels):
            acc = acc + ((T.Cast("int32", trained[c, j, 0, 0]) - T.Cast("int32", frozen[c, ch, 0, 0]))
                         * (T.Cast("int32", x[0, ch, r, px]) - x_zero))
        return acc

    def output(acc, c, bias, mult, shift):
        return clamp_int8(scale_shift(dsp.qadd(acc, bias[c]), mult[c], shift[c], y_zero, wide_shift), qmin, qmax)

    @T.macro
    def gemm(x, wt, trained, bias, mult, shift, y):
        rows = T.decl_buffer((oc * ic,), "int8", data=wt.data)
        col = T.alloc_buffer((2, ic // 2), "int32", scope="global")  # [pixel][pair]: (4g, 4g+2), (4g+1, 4g+3)
        acc = T.alloc_buffer((4,), "int32", scope="global")  # [channel * 2 + pixel]
        pairs = T.alloc_buffer((4,), "int32", scope="global")  # [channel * 2 + k]: weight pairs (4g+k, 4g+k+2)
        for r, cp in T.grid(h, w // 2):
            for g in range(ic // 4):
                for j in T.unroll(2):
                    for half in T.unroll(2):
                        col[j, 2 * g + half] = dsp.pack16(T.Cast("int32", x[0, 4 * g + half, r, 2 * cp + j]) - x_zero,
                                                          T.Cast("int32", x[0, 4 * g + half + 2, r, 2 * cp + j]) - x_zero)
            for o2 in range(oc // 2):
                for t in T.unroll(4):
                    acc[t] = 0
                for g in range(ic // 4):
                    for c in T.unroll(2):  # the C compiler merges each row's two loads into one
                        pairs[2 * c] = dsp.sxtb16(dsp.load_i32(rows[(2 * o2 + c) * ic + 4 * g]))
                        pairs[2 * c + 1] = dsp.sxtb16_ror8(dsp.load_i32(rows[(2 * o2 + c) * ic + 4 * g]))
                    for t in T.unroll(4):
                        acc[t] = dsp.smlad(pairs[t // 2 * 2 + 1], col[t % 2, 2 * g + 1], dsp.smlad(pairs[t // 2 * 2], col[t % 2, 2 * g], acc[t]))
                for t in T.unroll(4):
                    y[0, 2 * o2 + t // 2, r, 2 * cp + t % 2] = output(corrected(acc[t], 2 * o2 + t // 2, x, wt, trained, r, 2 * cp + t % 2),
                                                                      2 * o2 + t // 2, bias, mult, shift)

    if n_trained:
        @T.prim_func(private=True)
        def merged(x: T.Buffer((1, ic, h, w), "int8"), frozen: T.Buffer((oc, ic, 1, 1), "int8"),
                   trained: T.Buffer((oc, n_trained, 1, 1), "int8"), bias: T.Buffer((oc,), "int32"),
                   mult: T.Buffer((oc,), "int32"), shift: T.Buffer((oc,), "int32"), y: T.Buffer((1, oc, h, w), "int8")):
            gemm(x, frozen, trained, bias, mult, shift, y)

        return merged

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((1, ic, h, w), "int8"), wt: T.Buffer((oc, ic, 1, 1), "int8"), bias: T.Buffer((oc,), "int32"),
               mult: T.Buffer((oc,), "int32"), shift: T.Buffer((oc,), "int32"), y: T.Buffer((1, oc, h, w), "int8")):
        gemm(x, wt, None, bias, mult, shift, y)

    return kernel
