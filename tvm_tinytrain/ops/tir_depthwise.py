"""Depthwise convs with their requantization in TIR: one channel plane at a time, zero point folded.

Each channel's input plane sits in a stack buffer bordered by the conv's input zero point (the padding), so the
taps need no bounds checks.  The zero point is folded into the accumulators' start, ``-x_zero * sum(w)``, so
the inner loop multiplies raw int8 values (the border then contributes nothing), and a tile of output pixels
along a row shares each weight and each loaded input; two kernel rows at a time go through ``SMLAD`` (see
:func:`plane_conv`).  The channel's bias, multiplier and shift are copied to a local array first, so the C
compiler knows no output store changes them and computes their shift amounts once per channel.

:func:`depthwise_conv_requant` stages every input channel before writing that channel's outputs, so its
output may overwrite its input (``DepthwiseInPlace``); ``FuseExpandDepthwise``'s kernel
(:mod:`.tir_expand_depthwise`) fills the plane from the expansion instead.  Integer sums: the bits of the
tensor-expression kernels.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from . import dsp
from .schedule import cached_kernel, current_variant
from .te_kernels import requantize_value


def tile_width(out_width: int) -> int:
    return next(t for t in (4, 2, 1) if out_width % t == 0)


def requantized(acc, params, conv: dict, wide_shift: bool, at: int = 0):
    """``acc`` requantized with ``params[at:at + 3]`` = the channel's bias, multiplier and shift."""
    return requantize_value(acc, params[at], params[at + 1], params[at + 2], conv["y_zero"], conv["qmin"], conv["qmax"],
                            wide_shift)


@T.macro
def copy_channel_params(params, b, m, s, c, at):
    """``params[at:at + 3]`` = channel ``c``'s bias, multiplier and shift (see the module doc)."""
    params[at] = b[c]
    params[at + 1] = m[c]
    params[at + 2] = s[c]


def _paired_columns(k: int, stride: int, tile: int) -> int:
    """Columns of a kernel row pair that a tile of ``tile`` output pixels reads as ``SMLAD`` pairs, 0 where the
    tile reads fewer than four (a 32-bit load would pass them) and in the reference variant (the fused block
    backward's recomputed masks, plain C there)."""
    n = (tile - 1) * stride + k
    return n if k >= 2 and n >= 4 and current_variant() == "optimized" else 0


def tap_scratch(k: int, stride: int, wo: int) -> int:
    """int32 elements of :func:`plane_conv`'s ``taps`` scratch: the channel's weight pairs, then a row pair's columns."""
    return max(1, (k // 2) * k + _paired_columns(k, stride, tile_width(wo)))


def plane_conv(k: int, stride: int, ho: int, wo: int, conv: dict, wide_shift: bool, width: int | None = None):
    """A macro ``(plane, pc, w, b, m, s, c, start, params, acc, taps, y, yc)``: output channel ``c`` of the conv over
    ``plane[pc]`` (padded), into channel ``yc`` of ``y`` (``start``, ``params``, ``acc``, ``taps``: the caller's local
    scratch arrays of 1, 3, 4 and :func:`tap_scratch` int32).

    Two kernel rows are taken together on ``SMLAD``: each 32-bit load of four pixels of one row, ``PKHBT``/``PKHTB``ed
    with the same pixels of the next row and sign-extended by ``SXTB16`` (plain and rotated), gives each column's
    pair ``(x[row], x[row + 1])``, which meets the channel's weight pair ``(w[kh], w[kh + 1])`` of its tap: one
    instruction per two multiply-adds, and one load per four columns of two rows instead of eight.  An odd last
    kernel row multiplies byte by byte.

    With ``width`` the plane has no left and right border: its ``width`` columns are read where they are (a band
    kernel's window, not copied), and the tiles of output pixels whose taps reach past either side read the zero
    point there instead, byte by byte; the rest without a test."""
    tile, pad = tile_width(wo), (k - 1) // 2
    n_tiles, col0 = wo // tile, 0 if width is None else -pad
    inside = [q for q in range(n_tiles) if width is None
              or (q * tile * stride - pad >= 0 and ((q + 1) * tile - 1) * stride + k - 1 - pad <= width - 1)]
    first, last = (inside[0], inside[-1] + 1) if inside else (n_tiles, n_tiles)
    n_cols = _paired_columns(k, stride, tile)
    n_pairs = k // 2 if n_cols else 0
    # The columns in 32-bit loads: whole groups of four, then the last two or four (ending at the last column).
    n_quads, rest = divmod(n_cols, 4)

    def tap(plane, pc, row, col, checked: bool):
        if not checked:
            return T.Cast("int32", plane[pc, row, col])
        # The index clamped too: llvm may load both sides of the select.
        return T.Cast("int32", T.if_then_else(tirx.all(col >= 0, col < width), plane[pc, row, T.max(T.min(col, width - 1), 0)],
                                              T.int8(conv["x_zero"])))

    def column_pair(plane, pc, row, col, j: int):
        """``(plane[pc, row, col + j], plane[pc, row + 1, col + j])`` from a 32-bit load of four columns of each row."""
        return dsp.column_pair(dsp.load_i32(plane[pc, row, col]), dsp.load_i32(plane[pc, row + 1, col]), j)

    @T.macro
    def row_pair_columns(plane, pc, row, col, taps, at):
        """``taps[at + j]``: the pair ``(plane[pc, row, col + j], plane[pc, row + 1, col + j])`` of each paired column j."""
        for quad in T.unroll(n_quads):
            taps[at + 4 * quad] = column_pair(plane, pc, row, col + 4 * quad, 0)
            taps[at + 4 * quad + 1] = column_pair(plane, pc, row, col + 4 * quad, 1)
            taps[at + 4 * quad + 2] = column_pair(plane, pc, row, col + 4 * quad, 2)
            taps[at + 4 * quad + 3] = column_pair(plane, pc, row, col + 4 * quad, 3)
        if rest == 3:  # the last four columns: one of them again
            taps[at + n_cols - 4] = column_pair(plane, pc, row, col + n_cols - 4, 0)
            taps[at + n_cols - 3] = column_pair(plane, pc, row, col + n_cols - 4, 1)
        if rest > 0:  # the last two columns, from a load ending at the last
            taps[at + n_cols - 2] = column_pair(plane, pc, row, col + n_cols - 4, 2)
            taps[at + n_cols - 1] = column_pair(plane, pc, row, col + n_cols - 4, 3)

    @T.macro
    def tiles(plane, pc, w, c, start, params, acc, taps, y, yc, q0, n_q, checked):
        for oh, q in T.grid(ho, n_q):
            for t in T.unroll(tile):
                acc[t] = start[0]
            if checked or n_pairs == 0:
                for kh in range(k):
                    for kw in T.unroll(k):
                        for t in T.unroll(tile):
                            acc[t] = acc[t] + tap(plane, pc, oh * stride + kh, ((q0 + q) * tile + t) * stride + kw + col0, checked) * T.Cast(
                                "int32", w[c, 0, kh, kw])
            else:
                for i in range(n_pairs):
                    row_pair_columns(plane, pc, oh * stride + 2 * i, (q0 + q) * tile * stride + col0, taps, n_pairs * k)
                    for kw in T.unroll(k):
                        for t in T.unroll(tile):
                            acc[t] = dsp.smlad(taps[n_pairs * k + t * stride + kw], taps[i * k + kw], acc[t])
                if k % 2 == 1:
                    for kw in T.unroll(k):
                        for t in T.unroll(tile):
                            acc[t] = acc[t] + tap(plane, pc, oh * stride + k - 1, ((q0 + q) * tile + t) * stride + kw + col0, False) * T.Cast(
                                "int32", w[c, 0, k - 1, kw])
            for t in T.unroll(tile):
                y[0, yc, oh, (q0 + q) * tile + t] = requantized(acc[t], params, conv, wide_shift)

    @T.macro
    def conv_channel(plane, pc, w, b, m, s, c, start, params, acc, taps, y, yc):
        copy_channel_params(params, b, m, s, c, 0)
        start[0] = 0
        for kh, kw in T.grid(k, k):
            start[0] = start[0] - conv["x_zero"] * T.Cast("int32", w[c, 0, kh, kw])
        if n_pairs > 0:
            for i, kw in T.grid(n_pairs, k):  # the weight pairs (w[2i], w[2i + 1]) of each tap column
                taps[i * k + kw] = dsp.pack16(T.Cast("int32", w[c, 0, 2 * i, kw]), T.Cast("int32", w[c, 0, 2 * i + 1, kw]))
        if first > 0:
            tiles(plane, pc, w, c, start, params, acc, taps, y, yc, 0, first, True)
        if last > first:
            tiles(plane, pc, w, c, start, params, acc, taps, y, yc, first, last - first, False)
        if n_tiles > last:
            tiles(plane, pc, w, c, start, params, acc, taps, y, yc, last, n_tiles - last, True)

    return conv_channel


@cached_kernel
def depthwise_conv_requant(channels: int, h: int, w: int, k: int, stride: int, conv: dict, wide_shift: bool, pad_h: int | None = None):
    """PrimFunc ``(x, w, bias, mult, shift) -> y`` of a depthwise conv (padding ``(k-1)//2``, rows ``pad_h`` when
    given: 0 for StreamInputRows' band kernel, whose window of ``k`` rows gives one output row) then requantize;
    ``conv`` holds its ``x_zero``, ``y_zero``, ``qmin``, ``qmax``.  Without ``pad_h`` each input plane is staged
    inside its border first, so the output may share the input's storage; a band kernel reads its window where it
    is (:func:`plane_conv` with ``width``), and its output must not."""
    pad = (k - 1) // 2
    pad_h = pad if pad_h is None else pad_h
    ho, wo = (h + 2 * pad_h - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    band = pad_h == 0
    conv_channel = plane_conv(k, stride, ho, wo, conv, wide_shift, w if band else None)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((1, channels, h, w), "int8"), wt: T.Buffer((channels, 1, k, k), "int8"), bias: T.Buffer((channels,), "int32"),
               mult: T.Buffer((channels,), "int32"), shift: T.Buffer((channels,), "int32"), y: T.Buffer((1, channels, ho, wo), "int8")):
        window = T.decl_buffer((channels, h, w), "int8", data=x.data)
        plane = T.alloc_buffer((1, h + 2 * pad_h, w + 2 * pad) if not band else (1, 1, 1), "int8", scope="global")
        start = T.alloc_buffer((1,), "int32", scope="global")
        params = T.alloc_buffer((3,), "int32", scope="global")
        acc = T.alloc_buffer((4,), "int32", scope="global")
        taps = T.alloc_buffer((tap_scratch(k, stride, wo),), "int32", scope="global")
        if band:
            for c in range(channels):
                conv_channel(window, c, wt, bias, mult, shift, c, start, params, acc, taps, y, c)
        else:
            for i, j in T.grid(h + 2 * pad_h, w + 2 * pad):  # the border; each channel overwrites the inside
                plane[0, i, j] = T.int8(conv["x_zero"])
            for c in range(channels):
                for i, j in T.grid(h, w):
                    plane[0, i + pad_h, j + pad] = x[0, c, i, j]
                conv_channel(plane, 0, wt, bias, mult, shift, c, start, params, acc, taps, y, c)

    return kernel
