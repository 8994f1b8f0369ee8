"""Every int8 operator: TVM kernel (llvm) == numpy reference, bit for bit, on random shapes.

The numpy reference itself is checked against a plain-loop definition on small
shapes, and the fixed-point requantization against exact rational arithmetic.
"""

from __future__ import annotations

import inspect
from fractions import Fraction

import numpy as np
import pytest
import tvm
import tvm_ffi
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import te

from tvm_tinytrain.ops import reference, te_kernels
from tvm_tinytrain.ops.constants import AddRequant, Requant
from tvm_tinytrain.quant import INT32_MAX, INT32_MIN, add_multipliers, quantize_multiplier, quantize_multipliers

SETTINGS = settings(max_examples=25, deadline=None)


def run_te(build, arrays, out_dtype=None):
    """Compile ``build(*placeholders) -> te.Tensor`` for llvm and run it on ``arrays``."""
    phs = [te.placeholder(a.shape, str(a.dtype), f"in{i}") for i, a in enumerate(arrays)]
    out = build(*phs)
    fn = tvm.compile(te.create_prim_func([*phs, out]), target="llvm")
    res = tvm.runtime.empty([int(d) for d in out.shape], out.dtype)
    fn(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], res)
    return res.numpy()


def naive_conv(x, w, zx, stride, groups):
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    pad = (k - 1) // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, o, ho, wo), np.int64)
    for b in range(n):
        for oc in range(o):
            g = oc // (o // groups)
            for i in range(ho):
                for j in range(wo):
                    s = 0
                    for ci in range(cg):
                        for di in range(k):
                            for dj in range(k):
                                hi, wj = i * stride + di - pad, j * stride + dj - pad
                                if 0 <= hi < h and 0 <= wj < wd:
                                    s += (int(x[b, g * cg + ci, hi, wj]) - zx) * int(w[oc, ci, di, dj])
                    out[b, oc, i, j] = s
    return out


@st.composite
def conv_cases(draw, max_hw=12):
    depthwise = draw(st.booleans())
    c = draw(st.integers(1, 6))
    o = c if depthwise else draw(st.integers(1, 6))
    k = draw(st.sampled_from([1, 3, 5, 7]))
    stride = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (n, c, h, w)).astype(np.int8)
    wt = rng.integers(-128, 128, (o, 1 if depthwise else c, k, k)).astype(np.int8)
    return x, wt, draw(st.integers(-128, 127)), stride, c if depthwise else 1


@given(conv_cases())
@SETTINGS
def test_conv2d_acc_kernel_matches_reference(case):
    x, w, zx, stride, groups = case
    want = reference.conv2d_acc(x, w, zx, stride, groups)
    got = run_te(lambda a, b: te_kernels.conv2d_acc(a, b, zx, stride, groups), [x, w])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


@given(conv_cases(max_hw=6))
@settings(max_examples=15, deadline=None)
def test_reference_conv_matches_plain_loops(case):
    x, w, zx, stride, groups = case
    np.testing.assert_array_equal(reference.conv2d_acc(x, w, zx, stride, groups), naive_conv(x, w, zx, stride, groups))


rescales = st.one_of(st.floats(1e-12, 1e-6), st.floats(1e-6, 1.0), st.floats(1.0, 1000.0))


@st.composite
def requant_cases(draw, rescale=rescales):
    n, c, extra = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(0, 2))
    shape = (n, c) + (draw(st.integers(1, 4)),) * extra
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    acc = rng.integers(INT32_MIN, INT32_MAX, shape, dtype=np.int64)
    acc.flat[: acc.size // 2] //= 2**20  # mostly realistic magnitudes, some extremes
    bias = rng.integers(-50000, 50000, c).astype(np.int64)
    bias[0] = draw(st.sampled_from([INT32_MIN, INT32_MAX, 0, 17]))  # dead channel and saturation edge
    mult, shift = quantize_multipliers([draw(rescale) for _ in range(c)])
    zy = draw(st.integers(-128, 127))
    qmin = draw(st.integers(-128, 127))
    qmax = draw(st.integers(qmin, 127))
    return acc.astype(np.int32), bias.astype(np.int32), Requant(mult, shift, zy, qmin, qmax)


@given(requant_cases())
@SETTINGS
def test_requantize_kernel_matches_reference(case):
    acc, bias, rq = case
    want = reference.requantize(acc, bias, rq)
    got = run_te(lambda a, b, m, s: te_kernels.requantize(a, b, m, s, rq.y_zero, rq.qmin, rq.qmax), [acc, bias, rq.mult, rq.shift])
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, want)


@given(requant_cases(st.one_of(st.floats(1e-9, 1e-6), st.floats(1e-6, 0.24))))
@SETTINGS
def test_wide_shift_requantize_is_the_same(case):
    """The optimized kernels' wide-shift steps give the reference bits (dead channels and saturation included)."""
    acc, bias, rq = case
    assert int(rq.shift.min()) >= te_kernels.WIDE_SHIFT
    got = run_te(lambda a, b, m, s: te_kernels.requantize(a, b, m, s, rq.y_zero, rq.qmin, rq.qmax, wide_shift=True),
                 [acc, bias, rq.mult, rq.shift])
    np.testing.assert_array_equal(got, reference.requantize(acc, bias, rq))


@given(st.integers(INT32_MIN, INT32_MAX), rescales)
@settings(max_examples=300, deadline=None)
def test_fixed_point_rescale_is_within_one_step_of_exact(total, m):
    """round_half_up(total * M) by Q31 fixed point is off the exact rational result by at most
    one step plus the Q31 relative error (2**-31 of the result; irrelevant in the int8 range)."""
    mult, shift = quantize_multiplier(m)
    exact = Fraction(total) * Fraction(m)
    want = int((exact + Fraction(1, 2)).__floor__())
    got = int(reference.rshift_round(np.int64(total) * np.int64(mult), shift))
    assert abs(got - want) <= 1 + abs(exact) / 2**30
    if mult:
        assert (1 << 30) <= mult < (1 << 31) and 1 <= shift <= 62


def test_dead_channel_does_not_wrap():
    """bias = -2**31 with a ~4e-9 weight scale (the paper's dead channels) saturates to y_zero, never wraps."""
    acc = np.array([[-5000, 0, 5000]], np.int32).reshape(1, 3)
    bias = np.array([INT32_MIN, INT32_MIN, INT32_MIN], np.int32)
    rq = Requant(*quantize_multipliers([0.0078 * 3.9e-9 / 0.02] * 3), -128, -128, 127)
    np.testing.assert_array_equal(reference.requantize(acc, bias, rq), [[-128, -128, -128]])
    got = run_te(lambda a, b, m, s: te_kernels.requantize(a, b, m, s, -128, -128, 127), [acc, bias, rq.mult, rq.shift])
    np.testing.assert_array_equal(got, [[-128, -128, -128]])


def test_quantize_multiplier_rejects_unrepresentable():
    with pytest.raises(ValueError, match="conv7"):
        quantize_multiplier(2.0**31, "conv7")
    with pytest.raises(ValueError, match="finite"):
        quantize_multiplier(float("nan"))


@st.composite
def add_cases(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    a = rng.integers(-128, 128, shape).astype(np.int8)
    b = rng.integers(-128, 128, shape).astype(np.int8)
    sa, sb, sy = (draw(st.floats(0.001, 1.0)) for _ in range(3))
    ma, mb, sh = add_multipliers(sa, sb, sy)
    qmin = draw(st.integers(-128, 127))
    return a, b, AddRequant(draw(st.integers(-128, 127)), draw(st.integers(-128, 127)), ma, mb, sh,
                            draw(st.integers(-128, 127)), qmin, draw(st.integers(qmin, 127)))


@given(add_cases())
@SETTINGS
def test_add_kernel_matches_reference(case):
    a, b, p = case
    got = run_te(lambda x, y: te_kernels.add(x, y, p.a_zero, p.b_zero, p.a_mult, p.b_mult, p.shift, p.y_zero, p.qmin, p.qmax), [a, b])
    np.testing.assert_array_equal(got, reference.add(a, b, p))


@given(st.integers(1, 2), st.integers(1, 8), st.integers(1, 9), st.integers(1, 9), st.integers(-128, 127),
       st.floats(0.01, 1.0), st.integers(-128, 127), st.integers(0, 2**31))
@SETTINGS
def test_global_avg_pool_kernel_matches_reference(n, c, h, w, zx, rel_scale, zy, seed):
    x = np.random.default_rng(seed).integers(-128, 128, (n, c, h, w)).astype(np.int8)
    mult, shift = quantize_multipliers([rel_scale / (h * w)])
    rq = Requant(mult, shift, zy, -128, 127)
    got = run_te(lambda a: te_kernels.global_avg_pool(a, zx, int(mult[0]), int(shift[0]), zy), [x])
    want = reference.global_avg_pool(x, zx, rq)
    np.testing.assert_array_equal(got, want)
    real = np.clip(zy + rel_scale * (x.astype(np.float64) - zx).mean(axis=(2, 3)), -128, 127)
    assert np.abs(got - real).max() <= 0.5 + 1e-6  # the multiplier's 31 bits move it by far less than the rounding


@given(st.integers(1, 8), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8]), st.integers(-128, 127), st.integers(0, 2**31))
@SETTINGS
def test_global_avg_pool_with_the_same_params_is_the_rounded_mean(c, h, w, z, seed):
    """An area of a power of two has an exact multiplier: every tie rounds half up.  (For other areas the multiplier's
    last bit decides a tie, like any requantization's; the test above bounds those within half a step.)"""
    x = np.random.default_rng(seed).integers(-128, 128, (1, c, h, w)).astype(np.int8)
    mult, shift = quantize_multipliers([1.0 / (h * w)])
    got = run_te(lambda a: te_kernels.global_avg_pool(a, z, int(mult[0]), int(shift[0]), z), [x])
    want = np.floor((x.astype(np.float64) - z).mean(axis=(2, 3)) + 0.5) + z
    np.testing.assert_array_equal(got, np.clip(want, -128, 127))


@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 20), st.integers(-128, 127), st.integers(0, 2**31))
@SETTINGS
def test_linear_kernels_match_reference(n, i, o, zx, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (n, i)).astype(np.int8)
    w8 = rng.integers(-128, 128, (o, i)).astype(np.int8)
    got = run_te(lambda a, b: te_kernels.linear_acc(a, b, zx), [x, w8])
    np.testing.assert_array_equal(got, reference.linear_acc(x, w8, zx))
    np.testing.assert_array_equal(got, (x.astype(np.int64) - zx) @ w8.astype(np.int64).T)
    wf = rng.normal(0, 1, (o, i)).astype(np.float32)
    bf = rng.normal(0, 1, o).astype(np.float32)
    gotf = run_te(lambda a, b, c: te_kernels.linear_float(a, b, c, zx, 0.05), [x, wf, bf])
    assert gotf.dtype == np.float32
    np.testing.assert_array_equal(gotf, reference.linear_float(x, zx, 0.05, wf, bf))


def test_kernel_factories_are_memoized_per_variant_and_argument_values():
    from tvm_tinytrain.ops import tir_depthwise
    from tvm_tinytrain.ops.schedule import kernel_variant

    quant = {"x_zero": 3, "y_zero": -5, "qmin": -128, "qmax": 127}
    with kernel_variant("optimized"):
        first = tir_depthwise.depthwise_conv_requant(4, 6, 6, 3, 1, quant, False)
        assert tir_depthwise.depthwise_conv_requant(4, 6, 6, 3, 1, dict(quant), False) is first  # a dict by value
        other = tir_depthwise.depthwise_conv_requant(4, 6, 6, 3, 1, {**quant, "y_zero": -4}, False)
        assert other is not first and not tvm_ffi.structural_equal(other, first)
    with kernel_variant("reference"):  # the variant is part of the key: a factory may read it
        assert tir_depthwise.depthwise_conv_requant(4, 6, 6, 3, 1, quant, False) is not first
    with pytest.raises(TypeError):
        tir_depthwise.depthwise_conv_requant(4, 6, 6, 3, 1, quant, np.zeros(2))


def test_tvmscript_frame_lookups_see_what_inspect_sees():
    from tvm_tinytrain.ops._tvmscript_frames import _FrameInspect

    def both():
        return _FrameInspect.stack(), inspect.stack()

    fast, slow = both()
    assert len(fast) == len(slow)
    for f, s in zip(fast, slow):
        assert (f.frame, f.lineno, f.function, f.code_context) == (s.frame, s.lineno, s.function, s.code_context)
