"""The Cortex-M DSP and FPU instructions the optimized kernels use, as TIR calls with three lowerings.

A kernel's TIR calls ``tinytrain_smlad(a, b, acc)`` and friends with ``call_extern``.  Each name has

* on a Cortex-M with the DSP extension (M4, M7): a ``static inline`` C function of one instruction, the ACLE
  intrinsic where ACLE has one (``__smlad``, ``__sxtb16``, ``__qadd``, ``__ssat``) and inline assembly where it has not
  (``PKHBT``, ``PKHTB``, ``SXTB16`` with its rotation); the 32-bit load is a ``memcpy``, which gcc emits as one
  ``ldr`` (unaligned loads are legal on ARMv7-M);
* in any other C compiler (the host project): a portable C function with the same result;
* for TVM's llvm target (the host trainer's Relax VM, which cannot link C helpers):
  :class:`LowerDSPIntrinsics` replaces each call by the same arithmetic in plain TIR.

All three give the same bits, which the tests check (llvm and host C against numpy, host C against the
emulated board).  Halfword lanes follow the instructions: ``lo`` is bits 0-15, ``hi`` bits 16-31.

:class:`UseMultiplyAccumulate` is the float32 counterpart, applied by the C codegen only: every float
accumulation becomes ``tinytrain_fmla``, the FPU's ``VMLA.F32`` (product rounded, then the sum: the bits of
the C expression) on a Cortex-M with a single-precision FPU.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

from ..errors import TinyTrainError
from ..quant import INT32_MAX, INT32_MIN

SMLAD = "tinytrain_smlad"  # acc + lo(a)*lo(b) + hi(a)*hi(b)
SXTB16 = "tinytrain_sxtb16"  # (sext(byte 0), sext(byte 2)) as two halfwords
SXTB16_ROR8 = "tinytrain_sxtb16_ror8"  # (sext(byte 1), sext(byte 3))
PACK16 = "tinytrain_pack16"  # (lo(a), lo(b)): PKHBT
PACK16_HI = "tinytrain_pack16_hi"  # (hi(a), hi(b)): PKHTB
SSUB16 = "tinytrain_ssub16"  # (lo(a) - lo(b), hi(a) - hi(b)), each halfword wrapping
QADD = "tinytrain_qadd"  # int32 add, saturated
SSAT8 = "tinytrain_ssat8"  # int32 clamped to [-128, 127]
LOAD32 = "tinytrain_load_i32"  # four int8 bytes of a 1-D buffer, little-endian, at any alignment
FMLA = "tinytrain_fmla"  # float32 acc + a * b with the product rounded first: VMLA.F32, not a fused multiply-add
NAMES = (SMLAD, SXTB16, SXTB16_ROR8, PACK16, PACK16_HI, SSUB16, QADD, SSAT8, LOAD32, FMLA)

C_SOURCE = """\
/* DSP helpers of the optimized int8 kernels (tvm_tinytrain/ops/dsp.py): one instruction each on a Cortex-M
 * with the DSP extension, the same results in portable C elsewhere. */
static inline int32_t tinytrain_load_i32(const int8_t *p) {
  int32_t v;
  memcpy(&v, p, sizeof v);
  return v;
}
#if defined(__ARM_FP) && (__ARM_FP & 4)
/* VMLA rounds the product before the add, as the C expression does (gcc emits it only for contractions). */
static inline float tinytrain_fmla(float acc, float a, float b) {
  __asm__("vmla.f32 %0, %1, %2" : "+t"(acc) : "t"(a), "t"(b));
  return acc;
}
#else
static inline float tinytrain_fmla(float acc, float a, float b) { return acc + a * b; }
#endif
#if defined(__ARM_FEATURE_DSP)
#include <arm_acle.h>
static inline int32_t tinytrain_smlad(int32_t a, int32_t b, int32_t acc) { return (int32_t)__smlad((uint32_t)a, (uint32_t)b, acc); }
static inline int32_t tinytrain_sxtb16(int32_t a) { return (int32_t)__sxtb16((uint32_t)a); }
static inline int32_t tinytrain_qadd(int32_t a, int32_t b) { return __qadd(a, b); }
static inline int32_t tinytrain_ssat8(int32_t a) { return __ssat(a, 8); }
static inline int32_t tinytrain_ssub16(int32_t a, int32_t b) { return (int32_t)__ssub16((uint32_t)a, (uint32_t)b); }
/* ACLE has no PKHBT/PKHTB and no SXTB16 with its rotation, and gcc builds each from two or three instructions. */
static inline int32_t tinytrain_sxtb16_ror8(int32_t a) {
  int32_t r;
  __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(a));
  return r;
}
static inline int32_t tinytrain_pack16(int32_t lo, int32_t hi) {
  int32_t r;
  __asm__("pkhbt %0, %1, %2, lsl #16" : "=r"(r) : "r"(lo), "r"(hi));
  return r;
}
static inline int32_t tinytrain_pack16_hi(int32_t lo, int32_t hi) {
  int32_t r;
  __asm__("pkhtb %0, %2, %1, asr #16" : "=r"(r) : "r"(lo), "r"(hi));
  return r;
}
#else
static inline int32_t tinytrain_pack16(int32_t lo, int32_t hi) {
  return (int32_t)(((uint32_t)lo & 0xFFFFu) | ((uint32_t)hi << 16));
}
static inline int32_t tinytrain_pack16_hi(int32_t lo, int32_t hi) {
  return (int32_t)(((uint32_t)lo >> 16) | ((uint32_t)hi & 0xFFFF0000u));
}
static inline int32_t tinytrain_smlad(int32_t a, int32_t b, int32_t acc) {
  int64_t sum = (int64_t)acc + (int64_t)(int16_t)a * (int16_t)b + (int64_t)(a >> 16) * (b >> 16);
  return (int32_t)(uint32_t)(uint64_t)sum;
}
static inline int32_t tinytrain_sxtb16(int32_t a) { return tinytrain_pack16((int8_t)a, (int8_t)(a >> 16)); }
static inline int32_t tinytrain_ssub16(int32_t a, int32_t b) {
  return tinytrain_pack16((int16_t)a - (int16_t)b, (a >> 16) - (b >> 16));
}
static inline int32_t tinytrain_sxtb16_ror8(int32_t a) { return tinytrain_pack16((int8_t)(a >> 8), (int8_t)(a >> 24)); }
static inline int32_t tinytrain_ssat8(int32_t a) { return a > 127 ? 127 : a < -128 ? -128 : a; }
static inline int32_t tinytrain_qadd(int32_t a, int32_t b) {
  int64_t sum = (int64_t)a + b;
  return (int32_t)(sum > INT32_MAX ? INT32_MAX : sum < INT32_MIN ? INT32_MIN : sum);
}
#endif
"""


def _call(name: str, *args):
    # Pure, so TVM keeps a ``let`` of one as a C local (an opaque call's result would become a "local" scope buffer).
    return tirx.call_pure_extern("int32", name, *args)


def smlad(a, b, acc):
    return _call(SMLAD, a, b, acc)


def sxtb16(a):
    return _call(SXTB16, a)


def sxtb16_ror8(a):
    return _call(SXTB16_ROR8, a)


def pack16(lo, hi):
    return _call(PACK16, lo, hi)


def pack16_hi(lo, hi):
    return _call(PACK16_HI, lo, hi)


def ssub16(a, b):
    return _call(SSUB16, a, b)


def rows_side_by_side(a, b, j: int):
    """Bytes ``j - j % 2`` and ``j - j % 2 + 1`` of words ``a`` and ``b`` (two rows' 32-bit loads of the same four
    columns) side by side: ``PKHBT`` for columns 0-1, ``PKHTB`` for columns 2-3.  A kernel may keep the two packs in
    locals for the four columns' :func:`column_of` (measured: gcc schedules the expansion's inner loop better so)."""
    return pack16_hi(a, b) if j >= 2 else pack16(a, b)


def column_of(halves, j: int):
    """Column ``j``'s pair ``(byte j of a, byte j of b)``, sign-extended, from :func:`rows_side_by_side`'s pack:
    ``SXTB16``, rotated for the odd columns.  The operand ``SMLAD`` takes against a weight pair."""
    return sxtb16_ror8(halves) if j % 2 else sxtb16(halves)


def column_pair(a, b, j: int):
    """:func:`column_of` of :func:`rows_side_by_side`: column ``j``'s pair of rows from the two rows' words."""
    return column_of(rows_side_by_side(a, b, j), j)


def qadd(a, b):
    return _call(QADD, a, b)


def ssat8(a):
    return _call(SSAT8, a)


def load_i32(element):
    """The int32 made of ``element`` (a load from an int8 buffer) and the three bytes after it along the last axis.

    A memory read, hence not pure: use it inline, not in a ``let``."""
    return tirx.call_extern("int32", LOAD32, tirx.address_of(element))


def saturating_add(a, b):
    """``a + b`` saturated to int32, in plain int32 TIR: clamping ``a`` to the bounds ``b`` leaves never overflows."""
    b64 = b.astype("int64")
    lo = tirx.max(tirx.const(INT32_MIN, "int64") - b64, INT32_MIN).astype("int32")
    hi = tirx.min(tirx.const(INT32_MAX, "int64") - b64, INT32_MAX).astype("int32")
    return tirx.max(tirx.min(a, hi), lo) + b


def _sext(v, bits: int):
    if isinstance(v, tirx.IntImm):  # a constant operand (a packed zero point): TVM rejects narrowing its literal
        low = v.value & ((1 << bits) - 1)
        return tirx.const(low - (1 << bits) if low >> (bits - 1) else low, "int32")
    return v.astype(f"int{bits}").astype("int32")


def _pack16_tir(lo, hi):
    return tirx.bitwise_or(tirx.bitwise_and(lo, tirx.const(0xFFFF, "int32")), tirx.shift_left(hi, tirx.const(16, "int32")))


def _pack16_hi_tir(lo, hi):
    return _pack16_tir(_hi(lo), _hi(hi))


def _lo(v):
    return _sext(v, 16)


def _hi(v):
    return tirx.shift_right(v, tirx.const(16, "int32"))


def _byte(v, k: int):
    return _sext(tirx.shift_right(v, tirx.const(8 * k, "int32")) if k else v, 8)


def _load_i32_tir(address):
    load = address.args[0]
    if not isinstance(load, tvm.ir.expr.TensorLoad) or str(load.source.dtype) != "int8":
        raise TinyTrainError(f"LowerDSPIntrinsics: {LOAD32} takes the address of an element of an int8 buffer, got {address}")
    *outer, i = load.indices
    byte = [tirx.BufferLoad(load.source, [*outer, i + k]) for k in range(4)]
    low = [b.astype("uint8").astype("int32") for b in byte[:3]]
    return (low[0] | tirx.shift_left(low[1], tirx.const(8, "int32")) | tirx.shift_left(low[2], tirx.const(16, "int32"))
            | tirx.shift_left(byte[3].astype("int32"), tirx.const(24, "int32")))


_LOWERINGS = {
    SMLAD: lambda a, b, acc: acc + _lo(a) * _lo(b) + _hi(a) * _hi(b),
    SXTB16: lambda a: _pack16_tir(_byte(a, 0), _byte(a, 2)),
    SXTB16_ROR8: lambda a: _pack16_tir(_byte(a, 1), _byte(a, 3)),
    PACK16: _pack16_tir,
    PACK16_HI: _pack16_hi_tir,
    SSUB16: lambda a, b: _pack16_tir(_lo(a) - _lo(b), _hi(a) - _hi(b)),
    QADD: saturating_add,
    SSAT8: lambda a: tirx.max(tirx.min(a, 127), -128),
    LOAD32: _load_i32_tir,
}
_EXTERN_OPS = (tvm.ir.Op.get("tirx.call_extern"), tvm.ir.Op.get("tirx.call_pure_extern"))


def _lower_call(call):
    if not any(call.op.same_as(op) for op in _EXTERN_OPS) or str(call.args[0].value) not in _LOWERINGS:
        return call
    return _LOWERINGS[str(call.args[0].value)](*call.args[1:])


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="LowerDSPIntrinsics")
class LowerDSPIntrinsics:
    """Replace the DSP helper calls of :mod:`tvm_tinytrain.ops.dsp` by plain TIR arithmetic (for the llvm target).

    Before::

        acc[0] = T.call_extern("int32", "tinytrain_smlad", a, b, acc[0])

    After::

        acc[0] = acc[0] + T.Cast("int32", T.Cast("int16", a)) * T.Cast("int32", T.Cast("int16", b)) + T.shift_right(a, 16) * T.shift_right(b, 16)
    """

    def transform_function(self, func, mod, ctx):
        return func.with_body(tvm_ffi.structural_map(func.body, [(tvm.ir.Call, _lower_call)]))


def _multiply_accumulate(store):
    value = store.value
    if (str(value.ty.dtype) == "float32" and isinstance(value, tirx.Add) and isinstance(value.b, tirx.Mul)
            and isinstance(value.a, tvm.ir.expr.TensorLoad) and value.a.source.same_as(store.buffer)
            and len(value.a.indices) == len(store.indices) and all(tvm_ffi.structural_equal(i, j) for i, j in zip(value.a.indices, store.indices))):
        return tirx.BufferStore(store.buffer, tirx.call_pure_extern("float32", FMLA, value.a, value.b.a, value.b.b), store.indices)
    return store


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="UseMultiplyAccumulate")
class UseMultiplyAccumulate:
    """Every float32 accumulation ``buf[i] = buf[i] + a * b`` as one ``tinytrain_fmla`` call (C targets only).

    The C must keep the product's rounding (``-ffp-contract=off``), so gcc never emits the Cortex-M FPU's
    ``VMLA.F32``, which rounds the product too and saves the separate add.  The helper's C definition uses it
    where the FPU exists and is the plain expression elsewhere.

    Before::

        g_x[0] = g_x[0] + g[i] * w

    After::

        g_x[0] = T.call_pure_extern("float32", "tinytrain_fmla", g_x[0], g[i], w)
    """

    def transform_function(self, func, mod, ctx):
        return func.with_body(tvm_ffi.structural_map(func.body, [(tirx.BufferStore, _multiply_accumulate)]))
