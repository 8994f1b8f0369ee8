"""An inverted block's 1x1 expansion and depthwise conv in one kernel, on the DSP instructions, in TIR.

The kernel of ``FuseExpandDepthwise`` (optimized variant): for each expanded channel it computes the
channel's plane, requantized, into a stack buffer bordered by the depthwise conv's zero point, then
the depthwise conv over that plane.  The expansion is where the multiply-adds are; it takes its pairs for
``SMLAD`` from four input planes at once: 32-bit loads of four pixels of channels ``4g..4g+3``; ``PKHBT`` and
``PKHTB`` put the halfwords of two of them side by side (pixels 0-1 of both, then 2-3), and ``SXTB16`` (plain
and rotated) gives the halfword pairs ``(x[4g], x[4g+2])`` and ``(x[4g+1], x[4g+3])`` of each pixel, which meet
the weight pairs of one 32-bit weight load (see :mod:`.tir_conv_gemm`): two loads, two packs and four
extractions per four pairs.  No staging, so
it suits a kernel that reads the input once per expanded channel, or per two: where two channels' planes fit a
small C local, each input pair made serves both (:func:`channels_per_pass`; four more accumulators, fewer than
the repacking saves, on a Cortex-M's 13 registers).  Both zero points are folded into the
accumulators' start, ``-x_zero * sum(w)``, so the inner loops multiply raw int8 values; the plane's border
(the depthwise padding) holds the zero point and so contributes nothing.

Integer sums without overflow in any order: the bits of the tensor-expression kernels.
"""

from __future__ import annotations

from tvm.script import tirx as T

from . import dsp, tir_depthwise
from .schedule import cached_kernel

PAIRED_PLANES_BYTES = 1024  # two channels' bordered planes made together stay one C local (kernel_local_bytes)


def channels_per_pass(channels: int, plane_bytes: int) -> int:
    """Expanded channels :func:`expansion_plane` makes together: two where they pair up and their planes of
    ``plane_bytes`` stay within :data:`PAIRED_PLANES_BYTES` (a larger buffer would be arena workspace), else one."""
    return 2 if channels % 2 == 0 and 2 * plane_bytes <= PAIRED_PLANES_BYTES else 1


def fits(in_channels: int, batch: int, width: int) -> bool:
    """Whether :func:`expand_depthwise` takes this block (its expansion reads four channels by four pixels)."""
    return batch == 1 and in_channels % 4 == 0 and width % 4 == 0


def expansion_plane(ic: int, h: int, w: int, pad: int, expand: dict, wide_shift: bool, n: int = 1):
    """A macro ``(pixels, rows, b, m, s, c, start, pairs, lanes, params, acc, plane)``: expanded channels ``c .. c + n``,
    requantized, into ``plane[0 .. n]`` inside a border of ``pad``.  ``pixels`` and ``rows`` are the input ``(ic, h, w)``
    and the weight ``(channels, ic)`` as flat int8 buffers; the rest are the caller's int32 scratch arrays of ``n``,
    ``2n``, ``6``, ``3n`` and ``4n`` elements.  The input's halfword pairs, the costly part (four loads, four
    ``PKHBT``/``PKHTB`` and eight ``SXTB16`` per four channels of four pixels), serve all ``n`` channels.  Needs
    :func:`fits`."""
    # A few groups of four input channels are unrolled: the loop's set-up would cost as much as its body.
    group_loop = T.unroll if ic <= 16 else T.serial

    def channels_side_by_side(pixels, r, q, g, odd, j: int):
        """Pixels ``4q + j - j % 2`` and the next of channels ``4g + odd`` and ``4g + odd + 2``, row ``r``."""
        return dsp.rows_side_by_side(dsp.load_i32(pixels[((4 * g + odd) * h + r) * w + 4 * q]),
                                     dsp.load_i32(pixels[((4 * g + odd + 2) * h + r) * w + 4 * q]), j)

    @T.macro
    def expand_channels(pixels, rows, b, m, s, c, start, pairs, lanes, params, acc, plane):
        for f in T.unroll(n):
            tir_depthwise.copy_channel_params(params, b, m, s, c + f, 3 * f)
            start[f] = 0
            for i in range(ic):
                start[f] = start[f] - expand["x_zero"] * T.Cast("int32", rows[(c + f) * ic + i])
        for r, q in T.grid(h, w // 4):
            for f in T.unroll(n):
                for t in T.unroll(4):
                    acc[4 * f + t] = start[f]
            for g in group_loop(ic // 4):
                for f in T.unroll(n):
                    pairs[2 * f] = dsp.sxtb16(dsp.load_i32(rows[(c + f) * ic + 4 * g]))
                    pairs[2 * f + 1] = dsp.sxtb16_ror8(dsp.load_i32(rows[(c + f) * ic + 4 * g]))
                for odd in T.unroll(2):  # channels (4g, 4g+2), then (4g+1, 4g+3)
                    lanes[0] = channels_side_by_side(pixels, r, q, g, odd, 0)
                    lanes[1] = channels_side_by_side(pixels, r, q, g, odd, 2)
                    lanes[2] = dsp.column_of(lanes[0], 0)  # then each pixel's pair
                    lanes[3] = dsp.column_of(lanes[0], 1)
                    lanes[4] = dsp.column_of(lanes[1], 2)
                    lanes[5] = dsp.column_of(lanes[1], 3)
                    for f in T.unroll(n):
                        for t in T.unroll(4):
                            acc[4 * f + t] = dsp.smlad(pairs[2 * f + odd], lanes[2 + t], acc[4 * f + t])
            for f in T.unroll(n):
                for t in T.unroll(4):
                    plane[f, r + pad, 4 * q + t + pad] = tir_depthwise.requantized(acc[4 * f + t], params, expand, wide_shift, 3 * f)

    return expand_channels


@cached_kernel
def expand_depthwise(in_channels: int, channels: int, h: int, w: int, k: int, stride: int, expand: dict, depthwise: dict,
                     wide: tuple[bool, bool]):
    """PrimFunc ``(x, w_pw, b1, m1, s1, w_dw, b2, m2, s2) -> y``.  ``expand`` and ``depthwise`` hold each conv's
    ``x_zero``, ``y_zero``, ``qmin``, ``qmax``; ``wide`` their :func:`.te_kernels.scale_shift` modes.  Expanded channels
    are made two at a time where :func:`channels_per_pass` allows."""
    ic, c_out, pad = in_channels, channels, (k - 1) // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    plane_zero = depthwise["x_zero"]
    n = channels_per_pass(c_out, (h + 2 * pad) * (w + 2 * pad))
    expand_channels = expansion_plane(ic, h, w, pad, expand, wide[0], n)
    conv_channel = tir_depthwise.plane_conv(k, stride, ho, wo, depthwise, wide[1])

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((1, ic, h, w), "int8"), w_pw: T.Buffer((c_out, ic, 1, 1), "int8"), b1: T.Buffer((c_out,), "int32"),
               m1: T.Buffer((c_out,), "int32"), s1: T.Buffer((c_out,), "int32"), w_dw: T.Buffer((c_out, 1, k, k), "int8"),
               b2: T.Buffer((c_out,), "int32"), m2: T.Buffer((c_out,), "int32"), s2: T.Buffer((c_out,), "int32"),
               y: T.Buffer((1, c_out, ho, wo), "int8")):
        pixels = T.decl_buffer((ic * h * w,), "int8", data=x.data)
        rows = T.decl_buffer((c_out * ic,), "int8", data=w_pw.data)
        plane = T.alloc_buffer((n, h + 2 * pad, w + 2 * pad), "int8", scope="global")
        acc = T.alloc_buffer((4 * n,), "int32", scope="global")
        start = T.alloc_buffer((n,), "int32", scope="global")  # a folded zero point per channel
        pairs = T.alloc_buffer((2 * n,), "int32", scope="global")  # weight pairs (4g, 4g+2), (4g+1, 4g+3) per channel
        lanes = T.alloc_buffer((6,), "int32", scope="global")  # two input rows' halfwords side by side, each pixel's pair
        params = T.alloc_buffer((3 * n,), "int32", scope="global")  # bias, multiplier, shift per channel
        taps = T.alloc_buffer((tir_depthwise.tap_scratch(k, stride, wo),), "int32", scope="global")
        for f, i, j in T.grid(n, h + 2 * pad, w + 2 * pad):  # the border; each channel overwrites the inside
            plane[f, i, j] = T.int8(plane_zero)
        for c2 in range(c_out // n):
            expand_channels(pixels, rows, b1, m1, s1, c2 * n, start, pairs, lanes, params, acc, plane)
            for f in range(n):
                conv_channel(plane, f, w_dw, b2, m2, s2, c2 * n + f, start, params, acc, taps, y, c2 * n + f)

    return kernel
