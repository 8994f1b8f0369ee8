"""The int8 operators as TVM tensor expressions, one TIR PrimFunc each.

:mod:`tvm_tinytrain.relax_build` emits each with ``call_tir``, so the same
PrimFuncs compile for the host (llvm) and, later, to C.  The padding is
folded into the conv's reduction (no padded copy is materialised) because on
a microcontroller that copy would cost as much RAM as the input.
The integer recipe is that of :mod:`tvm_tinytrain.quant`.
"""

from __future__ import annotations

from tvm import te, tirx

from . import dsp
from .schedule import current_variant


def _rshift_round(v, shift):
    """``(v + 2**(shift-1)) >> shift`` on int64: round half up."""
    one = tirx.const(1, "int64")
    return tirx.shift_right(v + tirx.shift_left(one, shift - one), shift)


def conv2d_acc(x: te.Tensor, w: te.Tensor, x_zero: int, stride: int, groups: int, pad: int | None = None,
               pad_h: int | None = None) -> te.Tensor:
    """int32 ``acc[n,o,h,w] = sum (x - x_zero) * w`` with zero-point padding ``(k-1)//2`` (``pad=0``: ``x`` is already padded;
    ``pad_h`` overrides the rows' padding: 0 for a band of input rows whose padding rows are already in it)."""
    n, _, h, wd = (int(d) for d in x.shape)
    o, cg, k, _ = (int(d) for d in w.shape)
    pad = (k - 1) // 2 if pad is None else pad
    pad_h = pad if pad_h is None else pad_h
    ho = (h + 2 * pad_h - k) // stride + 1
    wo = (wd + 2 * pad - k) // stride + 1
    og = o // groups
    rc = te.reduce_axis((0, cg), "rc")
    rh = te.reduce_axis((0, k), "rh")
    rw = te.reduce_axis((0, k), "rw")

    def body(b, oc, oh, ow):
        ih = oh * stride + rh - pad_h
        iw = ow * stride + rw - pad
        c = (oc // og) * cg + rc if groups > 1 else rc
        inside = tirx.all(ih >= 0, ih < h, iw >= 0, iw < wd)
        xv = tirx.if_then_else(inside, x[b, c, ih, iw].astype("int32") - x_zero, tirx.const(0, "int32"))
        return te.sum(xv * w[oc, rc, rh, rw].astype("int32"), axis=[rc, rh, rw])

    return te.compute((n, o, ho, wo), body, name="acc")


def pad_plane(x: te.Tensor, pad: int, value: int) -> te.Tensor:
    """``x`` with ``pad`` elements of ``value`` (the zero point) around each (H, W) plane: a conv over it needs no bounds checks."""
    n, c, h, w = (int(d) for d in x.shape)

    def body(b, ch, i, j):
        inside = tirx.all(i >= pad, i < h + pad, j >= pad, j < w + pad)
        return tirx.if_then_else(inside, x[b, ch, i - pad, j - pad], tirx.const(value, x.dtype))

    return te.compute((n, c, h + 2 * pad, w + 2 * pad), body, name="plane")


def clamp_int8(v, qmin: int, qmax: int):
    """The output clamp (which is also the folded activation) and the cast to int8; the whole int8 range is
    one SSAT on a Cortex-M in the optimized variant."""
    if (qmin, qmax) == (-128, 127) and current_variant() == "optimized" and v.ty.dtype == "int32":
        return dsp.ssat8(v).astype("int8")
    return tirx.max(tirx.min(v, qmax), qmin).astype("int8")


def requant_preclamp(acc: te.Tensor, bias: te.Tensor | None, mult: te.Tensor, shift: te.Tensor, y_zero: int, idx,
                     wide_shift: bool = False):
    """Value of :func:`requantize` at ``idx`` before the clamp (see :func:`scale_shift`)."""
    c = idx[1]
    total = acc[idx] if bias is None else add_bias(acc[idx], bias[c])
    return scale_shift(total, mult[c], shift[c], y_zero, wide_shift)


def add_bias(acc, bias):
    """int32 ``acc + bias``, saturated: QADD, one instruction on a Cortex-M, in the optimized variant."""
    return (dsp.qadd if current_variant() == "optimized" else dsp.saturating_add)(acc, bias)


def requantize_value(acc, bias, mult, shift, y_zero: int, qmin: int, qmax: int, wide_shift: bool = False):
    """:func:`requantize` of one int32 accumulator value, given its channel's bias, multiplier and shift (TIR kernels)."""
    return clamp_int8(scale_shift(add_bias(acc, bias), mult, shift, y_zero, wide_shift), qmin, qmax)


WIDE_SHIFT = 33


def scale_shift(total, mult, shift, y_zero: int, wide_shift: bool = False):
    """``round(total * mult / 2**shift) + y_zero`` of an int32 ``total`` (the accumulator plus bias), before the clamp.

    In int64, or, with ``wide_shift`` (every shift >= :data:`WIDE_SHIFT`, known when the kernel is built), in the
    32-bit steps that a Cortex-M does in one instruction each: ``int32 x int32 -> int64`` for the product and,
    since ``2**(s-1)`` is then a multiple of ``2**32``, ``(p + 2**(s-1)) >> s == ((p >> 32) + 2**(s-33)) >> (s-32)``
    on the product's high word.
    """
    if not wide_shift:
        return _rshift_round(total.astype("int64") * mult.astype("int64"), shift.astype("int64")) + y_zero
    product_high = tirx.shift_right(total.astype("int64") * mult.astype("int64"), tirx.const(32, "int64")).astype("int32")
    # Shift amounts are clamped to [0, 31] (a no-op for shifts in [33, 62]): with unbounded amounts, TVM 0.27's
    # integer bound analysis treats the shifted value as already inside the int8 clamp and drops that clamp.
    k = tirx.min(tirx.max(shift - 32, 0), 31)
    rounding = tirx.shift_left(tirx.const(1, "int32"), tirx.min(tirx.max(shift - 33, 0), 31))
    return tirx.shift_right(product_high + rounding, k) + y_zero


def requantize(acc: te.Tensor, bias: te.Tensor | None, mult: te.Tensor, shift: te.Tensor,
               y_zero: int, qmin: int, qmax: int, wide_shift: bool = False) -> te.Tensor:
    """Per-channel (axis 1) int32 -> int8 with saturating bias add and clamp (``wide_shift``: see :func:`requant_preclamp`)."""
    return te.compute(acc.shape, lambda *idx: clamp_int8(requant_preclamp(acc, bias, mult, shift, y_zero, idx, wide_shift), qmin, qmax),
                      name="requant")


def add_preclamp(a: te.Tensor, b: te.Tensor, a_zero: int, b_zero: int, a_mult: int, b_mult: int, shift: int, y_zero: int, idx):
    """int64 value of :func:`add` at ``idx`` before the clamp (the backward's mask tests it)."""
    ta = (a[idx].astype("int64") - a_zero) * tirx.const(a_mult, "int64")
    tb = (b[idx].astype("int64") - b_zero) * tirx.const(b_mult, "int64")
    return _rshift_round(ta + tb, tirx.const(shift, "int64")) + y_zero


def add(a: te.Tensor, b: te.Tensor, a_zero: int, b_zero: int, a_mult: int, b_mult: int,
        shift: int, y_zero: int, qmin: int, qmax: int) -> te.Tensor:
    """Residual add, both operands rescaled to the output's params with one shared shift."""

    def body(*idx):
        return clamp_int8(add_preclamp(a, b, a_zero, b_zero, a_mult, b_mult, shift, y_zero, idx), qmin, qmax)

    return te.compute(a.shape, body, name="add")


def global_avg_pool(x: te.Tensor, x_zero: int, mult: int, shift: int, y_zero: int) -> te.Tensor:
    """int8 (N, C, H, W) -> int8 (N, C): ``sum(x - x_zero)`` rescaled by ``1/(H*W)``."""
    n, c, h, w = x.shape
    rh = te.reduce_axis((0, h), "rh")
    rw = te.reduce_axis((0, w), "rw")
    total = te.compute((n, c), lambda b, ch: te.sum(x[b, ch, rh, rw].astype("int32") - x_zero, axis=[rh, rw]), name="sum")

    def body(b, ch):
        y = _rshift_round(total[b, ch].astype("int64") * tirx.const(mult, "int64"), tirx.const(shift, "int64")) + y_zero
        return tirx.max(tirx.min(y, 127), -128).astype("int8")

    return te.compute((n, c), body, name="pool")


def linear_acc(x: te.Tensor, w: te.Tensor, x_zero: int) -> te.Tensor:
    """int32 ``acc[n,o] = sum_i (x[n,i] - x_zero) * w[o,i]``."""
    n, i = x.shape
    o = w.shape[0]
    r = te.reduce_axis((0, i), "ri")
    return te.compute((n, o), lambda b, oc: te.sum((x[b, r].astype("int32") - x_zero) * w[oc, r].astype("int32"), axis=r), name="acc")


def dequantize_f32(v, zero: int, scale: float):
    """float32 real value ``(float(v) - zero) * scale`` of one int8 element; the float head and its gradient share it."""
    return (v.astype("float32") - tirx.const(zero, "float32")) * tirx.const(scale, "float32")


def linear_float(x: te.Tensor, w: te.Tensor, bias: te.Tensor, x_zero: int, x_scale: float) -> te.Tensor:
    """float32 logits of the dequantized int8 input: ``((x - x_zero) * x_scale) @ w.T + bias``."""
    n, i = x.shape
    o = w.shape[0]
    r = te.reduce_axis((0, i), "ri")
    xf = te.compute((n, i), lambda b, k: dequantize_f32(x[b, k], x_zero, x_scale), name="xf")
    mm = te.compute((n, o), lambda b, oc: te.sum(xf[b, r] * w[oc, r], axis=r), name="mm")
    return te.compute((n, o), lambda b, oc: mm[b, oc] + bias[oc], name="logits")
