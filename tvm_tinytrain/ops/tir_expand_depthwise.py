"""An inverted block's 1x1 expansion and depthwise conv in one kernel, on the DSP instructions, in TIR.

The kernel of ``FuseExpandDepthwise`` (optimized variant): for each expanded channel it computes the
channel's plane, requantized, into a stack buffer bordered by the depthwise conv's zero point, then
the depthwise conv over that plane.  The expansion is where the multiply-adds are; it takes its pairs for
``SMLAD`` from four input planes at once: 32-bit loads of four pixels of channels ``4g..4g+3``, ``SXTB16``
and ``PKHBT``/``PKHTB`` give the halfword pairs ``(x[4g], x[4g+2])`` and ``(x[4g+1], x[4g+3])`` of each
pixel, which meet the weight pairs of one 32-bit weight load (see :mod:`.tir_conv_gemm`).  No staging, so
it suits a kernel that reads the input once per expanded channel.  Both zero points are folded into the
accumulators' start, ``-x_zero * sum(w)``, so the inner loops multiply raw int8 values; the plane's border
(the depthwise padding) holds the zero point and so contributes nothing.

Integer sums without overflow in any order: the bits of the tensor-expression kernels.
"""

from __future__ import annotations

from tvm.script import tirx as T

from . import dsp, tir_depthwise
from .schedule import cached_kernel


def fits(in_channels: int, batch: int, width: int) -> bool:
    """Whether :func:`expand_depthwise` takes this block (its expansion reads four channels by four pixels)."""
    return batch == 1 and in_channels % 4 == 0 and width % 4 == 0


def expansion_plane(ic: int, h: int, w: int, pad: int, expand: dict, wide_shift: bool):
    """A macro ``(pixels, rows, b, m, s, c, start, pairs, lanes, params, acc, plane)``: expanded channel ``c``,
    requantized, into ``plane`` inside a border of ``pad``.  ``pixels`` and ``rows`` are the input ``(ic, h, w)`` and
    the weight ``(channels, ic)`` as flat int8 buffers; the rest are the caller's int32 scratch arrays of 1, 2, 4, 3
    and 4 elements.  Needs :func:`fits`."""
    # A few groups of four input channels are unrolled: the loop's set-up would cost as much as its body.
    group_loop = T.unroll if ic <= 16 else T.serial

    @T.macro
    def expand_channel(pixels, rows, b, m, s, c, start, pairs, lanes, params, acc, plane):
        tir_depthwise.copy_channel_params(params, b, m, s, c)
        start[0] = 0
        for i in range(ic):
            start[0] = start[0] - expand["x_zero"] * T.Cast("int32", rows[c * ic + i])
        for r, q in T.grid(h, w // 4):
            for t in T.unroll(4):
                acc[t] = start[0]
            for g in group_loop(ic // 4):
                pairs[0] = dsp.sxtb16(dsp.load_i32(rows[c * ic + 4 * g]))
                pairs[1] = dsp.sxtb16_ror8(dsp.load_i32(rows[c * ic + 4 * g]))
                for odd in T.unroll(2):  # channels (4g, 4g+2), then (4g+1, 4g+3)
                    lanes[0] = dsp.sxtb16(dsp.load_i32(pixels[((4 * g + odd) * h + r) * w + 4 * q]))
                    lanes[1] = dsp.sxtb16_ror8(dsp.load_i32(pixels[((4 * g + odd) * h + r) * w + 4 * q]))
                    lanes[2] = dsp.sxtb16(dsp.load_i32(pixels[((4 * g + odd + 2) * h + r) * w + 4 * q]))
                    lanes[3] = dsp.sxtb16_ror8(dsp.load_i32(pixels[((4 * g + odd + 2) * h + r) * w + 4 * q]))
                    acc[0] = dsp.smlad(pairs[odd], dsp.pack16(lanes[0], lanes[2]), acc[0])
                    acc[1] = dsp.smlad(pairs[odd], dsp.pack16(lanes[1], lanes[3]), acc[1])
                    acc[2] = dsp.smlad(pairs[odd], dsp.pack16_hi(lanes[0], lanes[2]), acc[2])
                    acc[3] = dsp.smlad(pairs[odd], dsp.pack16_hi(lanes[1], lanes[3]), acc[3])
            for t in T.unroll(4):
                plane[r + pad, 4 * q + t + pad] = tir_depthwise.requantized(acc[t], params, expand, wide_shift)

    return expand_channel


@cached_kernel
def expand_depthwise(in_channels: int, channels: int, h: int, w: int, k: int, stride: int, expand: dict, depthwise: dict,
                     wide: tuple[bool, bool]):
    """PrimFunc ``(x, w_pw, b1, m1, s1, w_dw, b2, m2, s2) -> y``.  ``expand`` and ``depthwise`` hold each conv's
    ``x_zero``, ``y_zero``, ``qmin``, ``qmax``; ``wide`` their :func:`.te_kernels.scale_shift` modes."""
    ic, c_out, pad = in_channels, channels, (k - 1) // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    plane_zero = depthwise["x_zero"]
    expand_channel = expansion_plane(ic, h, w, pad, expand, wide[0])
    conv_channel = tir_depthwise.plane_conv(k, stride, ho, wo, depthwise, wide[1])

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((1, ic, h, w), "int8"), w_pw: T.Buffer((c_out, ic, 1, 1), "int8"), b1: T.Buffer((c_out,), "int32"),
               m1: T.Buffer((c_out,), "int32"), s1: T.Buffer((c_out,), "int32"), w_dw: T.Buffer((c_out, 1, k, k), "int8"),
               b2: T.Buffer((c_out,), "int32"), m2: T.Buffer((c_out,), "int32"), s2: T.Buffer((c_out,), "int32"),
               y: T.Buffer((1, c_out, ho, wo), "int8")):
        pixels = T.decl_buffer((ic * h * w,), "int8", data=x.data)
        rows = T.decl_buffer((c_out * ic,), "int8", data=w_pw.data)
        plane = T.alloc_buffer((h + 2 * pad, w + 2 * pad), "int8", scope="global")
        acc = T.alloc_buffer((4,), "int32", scope="global")
        start = T.alloc_buffer((1,), "int32", scope="global")  # a folded zero point
        pairs = T.alloc_buffer((2,), "int32", scope="global")  # weight pairs (4g, 4g+2), (4g+1, 4g+3)
        lanes = T.alloc_buffer((4,), "int32", scope="global")  # SXTB16 of two input rows: even, odd pixels
        params = T.alloc_buffer((3,), "int32", scope="global")  # bias, multiplier, shift of the channel
        for i, j in T.grid(h + 2 * pad, w + 2 * pad):  # the border; each channel overwrites the inside
            plane[i, j] = T.int8(plane_zero)
        for c in range(c_out):
            expand_channel(pixels, rows, b1, m1, s1, c, start, pairs, lanes, params, acc, plane)
            conv_channel(plane, w_dw, b2, m2, s2, c, start, params, acc, y, c)

    return kernel
