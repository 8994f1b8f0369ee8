"""Backward kernels: TIR (llvm) == numpy reference bit for bit, and the math is right.

Bit-exactness is checked on random shapes; correctness separately, against
central finite differences of the real-valued forward in float64 (convs,
softmax cross-entropy, pooling, the float classifier), against the QAS
relation of ``../shared/PAPER.md`` section 2, and on hand-made saturating
updates.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_ops import add_cases, requant_cases
from tvm import te

from relax_passes import pass_config
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.ops import dsp, reference, te_backward, te_kernels
from tvm_tinytrain.ops import reference_backward as ref
from tvm_tinytrain.ops.schedule import VARIANTS, compact_schedule, kernel_variant
from tvm_tinytrain.quant import INT32_MAX, INT32_MIN

SETTINGS = settings(max_examples=15, deadline=None)
F32 = np.float32


def compile_te(build, *arrays):
    """Compile ``build(*placeholders)`` (one tensor or a tuple) for llvm; returns ``call(*arrays) -> output(s)``.

    The placeholders take the shapes and dtypes of ``arrays``; the returned function may be called with any
    arrays of those shapes, so a config is compiled once however many values it is tested on.
    """
    phs = [te.placeholder(a.shape, str(a.dtype), f"in{i}") for i, a in enumerate(arrays)]
    outs = build(*phs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    fn = tvm.compile(te.create_prim_func([*phs, *outs]), target="llvm")

    def call(*values):
        res = [tvm.runtime.empty([int(d) for d in o.shape], o.dtype) for o in outs]
        fn(*[tvm.runtime.tensor(np.ascontiguousarray(v)) for v in values], *res)
        res = [r.numpy() for r in res]
        return res[0] if len(res) == 1 else tuple(res)

    return call


def run_te(build, *arrays):
    return compile_te(build, *arrays)(*arrays)


def assert_same(got, want):
    """Bit-exact float32 equality (dtype and every bit, so -0.0 != 0.0)."""
    assert got.dtype == want.dtype == F32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def central_diff(f, x: np.ndarray, eps: float) -> np.ndarray:
    """float64 gradient of scalar ``f`` at ``x`` by central differences, element by element."""
    x = x.astype(np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        grad[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return grad


def conv_real(x: np.ndarray, w: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """float64 real-valued conv with zero padding ``(k-1)//2`` (the forward of the int8 conv)."""
    _, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    pad = (k - 1) // 2
    xs = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    ih = (np.arange(ho) * stride)[:, None] + np.arange(k)
    iw = (np.arange(wo) * stride)[:, None] + np.arange(k)
    patches = xs[:, :, ih[:, None, :, None], iw[None, :, None, :]]  # n, c, ho, wo, kh, kw
    og = o // groups
    return np.concatenate([np.einsum("nchwij,ocij->nohw", patches[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og]) for g in range(groups)], axis=1)


# ---------------------------------------------------------------- masks
@given(requant_cases())
@SETTINGS
def test_clamp_mask_of_requantize(case):
    acc, bias, rq = case
    check_clamp_mask(reference.requantize(acc, bias, rq), rq.qmin, rq.qmax)


@given(add_cases())
@SETTINGS
def test_clamp_mask_of_add(case):
    a, b, p = case
    check_clamp_mask(reference.add(a, b, p), p.qmin, p.qmax)


def check_clamp_mask(y, qmin, qmax):
    """The kernel's mask of an int8 output == the numpy reference's, with the clamp-gradient semantics."""
    mask = run_te(lambda t: te_backward.clamp_mask(t, qmin, qmax), y)
    np.testing.assert_array_equal(mask, ref.clamp_mask(y, qmin, qmax))
    check_mask_semantics(y, mask, qmin, qmax)


def check_mask_semantics(y, mask, qmin, qmax):
    """Exactly the outputs strictly inside the range are unsaturated; padding bits are 0."""
    assert mask.dtype == np.uint8 and mask.shape == ((y.size + 7) // 8,)
    bits = ref.unpack_mask(mask, y.shape)
    np.testing.assert_array_equal(bits, (y > qmin) & (y < qmax))
    assert not np.unpackbits(mask, bitorder="little")[y.size:].any()


@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(0, 2**31))
@SETTINGS
def test_apply_mask(shape, seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=shape).astype(F32)
    g.flat[0] = np.inf  # a masked-out inf must become 0, not NaN
    bits = rng.random(shape) < 0.5
    bits.flat[0] = False
    mask = np.packbits(bits.ravel(), bitorder="little")
    got = run_te(te_backward.apply_mask, g, mask)
    assert_same(got, ref.apply_mask(g, mask))
    assert_same(got, np.where(bits, g, F32(0)))


@given(st.lists(st.integers(1, 6), min_size=4, max_size=4), st.integers(0, 2**31), st.sampled_from(VARIANTS))
@SETTINGS
def test_masked_bias_grad_is_apply_mask_then_bias_grad(shape, seed, variant):
    """``masked_bias_grad(g, mask, scale)`` == bias_grad(apply_mask(g, mask)) of the numpy reference, bit for bit, in
    both schedules, with no stored masked copy (its workspace is that of ``bias_grad`` alone)."""
    from relax_passes._buffers import kernel_workspace_bytes

    rng = np.random.default_rng(seed)
    g = rng.normal(size=shape).astype(F32)
    mask = rng.integers(0, 256, ((g.size + 7) // 8,)).astype(np.uint8)
    scale = rng.uniform(1, 100, shape[1]).astype(F32)
    phs = [te.placeholder(a.shape, str(a.dtype), f"in{i}") for i, a in enumerate((g, mask, scale))]
    with kernel_variant(variant):
        prim = compact_schedule(te.create_prim_func([*phs, te_backward.masked_bias_grad(*phs)]))
        plain = compact_schedule(te.create_prim_func([phs[0], phs[2], te_backward.bias_grad(phs[0], phs[2])]))
    with pass_config(kernel_local_bytes=0):  # every internal buffer in the workspace, however small
        assert kernel_workspace_bytes(prim, "masked_bias_grad") == kernel_workspace_bytes(plain, "bias_grad") > 0
    fn = tvm.compile(prim, target="llvm")
    got = tvm.runtime.empty([shape[1]], "float32")
    fn(*[tvm.runtime.tensor(a) for a in (g, mask, scale)], got)
    assert_same(got.numpy(), ref.bias_grad(ref.apply_mask(g, mask), scale))


# ---------------------------------------------------------------- convolution
@st.composite
def conv_grad_cases(draw, max_c=5, max_hw=9, kernels=(1, 3, 5, 7)):
    """A conv (depthwise or groups 1), its output gradient, and a channel selection (possibly a strict, unsorted subset)."""
    depthwise = draw(st.booleans())
    c = draw(st.integers(1, max_c))
    o = c if depthwise else draw(st.integers(1, max_c))
    k, stride, n = draw(st.sampled_from(kernels)), draw(st.sampled_from([1, 2])), draw(st.integers(1, 2))
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    order = draw(st.permutations(range(c)))
    channels = tuple(order[:draw(st.integers(1, c))])
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    pad = (k - 1) // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    return {
        "x": rng.integers(-128, 128, (n, c, h, w)).astype(np.int8),
        "x_zero": int(rng.integers(-128, 128)),
        "w": rng.integers(-128, 128, (o, 1 if depthwise else c, k, k)).astype(np.int8),
        "w_scales": rng.uniform(0.001, 0.02, o).astype(F32),
        "g": rng.normal(size=(n, o, ho, wo)).astype(F32),
        "stride": stride, "groups": c if depthwise else 1, "channels": channels,
    }


def conv_grads(case, scale_fn):
    """(TIR, reference) pairs of the input, weight and bias gradients; ``scale_fn(rows)`` gives the per-row scales."""
    x, g, w, ws, stride, groups, channels = (case[key] for key in ("x", "g", "w", "w_scales", "stride", "groups", "channels"))
    k, zx = w.shape[2], case["x_zero"]
    dw = channels if groups > 1 else None
    x_sel = run_te(lambda a: te_backward.gather_channels(a, channels), x)
    np.testing.assert_array_equal(x_sel, ref.gather_channels(x, channels))
    w_scale = scale_fn(len(channels) if dw else w.shape[0])
    b_scale = scale_fn(w.shape[0])
    return {
        "input": (run_te(lambda a, b, c: te_backward.conv2d_input_grad(a, b, c, x.shape, stride, groups), g, w, ws),
                  ref.conv2d_input_grad(g, w, ws, x.shape, stride, groups)),
        "weight": (run_te(lambda a, b, c: te_backward.conv2d_weight_grad(a, b, zx, stride, k, c, dw), x_sel, g, w_scale),
                   ref.conv2d_weight_grad(x_sel, g, zx, stride, k, w_scale, dw)),
        "bias": (run_te(te_backward.bias_grad, g, b_scale), ref.bias_grad(g, b_scale)),
    }


@given(conv_grad_cases(), st.integers(0, 2**31))
@settings(max_examples=25, deadline=None)
def test_conv_grads_match_reference(case, seed):
    rng = np.random.default_rng(seed)
    for got, want in conv_grads(case, lambda rows: rng.uniform(0.1, 10.0, rows).astype(F32)).values():
        assert_same(got, want)


@given(conv_grad_cases(max_c=3, max_hw=5, kernels=(1, 3, 5)))
@settings(max_examples=8, deadline=None)
def test_conv_grads_match_finite_differences(case):
    """With scale 1 the kernels are the gradients of ``sum(G * conv(x_real, W_real))`` w.r.t. x_real and W_real."""
    x, g, w, ws, stride, groups, channels = (case[key] for key in ("x", "g", "w", "w_scales", "stride", "groups", "channels"))
    x_real = x.astype(np.float64) - case["x_zero"]
    w_real = w.astype(np.float64) * ws.astype(np.float64)[:, None, None, None]
    got = {name: pair[0] for name, pair in conv_grads(case, lambda rows: np.ones(rows, F32)).items()}
    g64 = g.astype(np.float64)
    want_x = central_diff(lambda v: np.sum(g64 * conv_real(v, w_real, stride, groups)), x_real, 1.0)
    want_w = central_diff(lambda v: np.sum(g64 * conv_real(x_real, v, stride, groups)), w_real, 1.0)
    want_w = want_w[list(channels)] if groups > 1 else want_w[:, list(channels)]
    np.testing.assert_allclose(got["input"], want_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["weight"], want_w, rtol=1e-4, atol=1e-4 * np.abs(want_w).max(initial=1.0))
    np.testing.assert_allclose(got["bias"], g64.sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-4)


def test_conv_grads_reject_a_mismatched_output_shape():
    g = te.placeholder((1, 2, 3, 3), "float32")
    with pytest.raises(TinyTrainError, match="gives no 3x3 output"):
        te_backward.conv2d_input_grad(g, te.placeholder((2, 2, 3, 3), "int8"), te.placeholder((2,), "float32"), (1, 2, 5, 5), 1, 1)
    with pytest.raises(TinyTrainError, match="gives no 3x3 output"):
        te_backward.conv2d_weight_grad(te.placeholder((1, 2, 5, 5), "int8"), g, 0, 1, 3, te.placeholder((2,), "float32"))


def test_qas_scaling_of_int8_weight_and_bias_gradients():
    """PAPER.md section 2: ``scale = x_scale / w_scale[o]`` yields ``G_Wbar * w_scale**-2`` and
    ``1 / (x_scale * w_scale[o])`` yields ``G_bbar * (w_scale * x_scale)**-2``, where Wbar, bbar are the
    int8 weight and int32 bias of ``y = conv(s_x (x - z_x), s_w Wbar) + s_x s_w bbar``."""
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, (1, 2, 4, 5)).astype(np.int8)
    w_bar = rng.integers(-127, 128, (3, 2, 3, 3)).astype(np.int8)
    b_bar = rng.integers(-500, 500, 3).astype(np.int32)
    s_x, z_x = 0.02, -7
    s_w = np.array([0.004, 0.01, 0.0007], F32)
    g = rng.normal(size=(1, 3, 4, 5)).astype(F32)
    x_real = s_x * (x.astype(np.float64) - z_x)
    sw64 = s_w.astype(np.float64)

    def loss(wb, bb):
        y = conv_real(x_real, wb * sw64[:, None, None, None], 1, 1) + (s_x * sw64 * bb)[None, :, None, None]
        return np.sum(g.astype(np.float64) * y)

    g_wbar = central_diff(lambda v: loss(v, b_bar.astype(np.float64)), w_bar.astype(np.float64), 1.0)
    g_bbar = central_diff(lambda v: loss(w_bar.astype(np.float64), v), b_bar.astype(np.float64), 1.0)
    got_w = run_te(lambda a, b, c: te_backward.conv2d_weight_grad(a, b, z_x, 1, 3, c), x, g, (F32(s_x) / s_w).astype(F32))
    got_b = run_te(te_backward.bias_grad, g, (F32(1) / (F32(s_x) * s_w)).astype(F32))
    np.testing.assert_allclose(got_w, g_wbar * sw64[:, None, None, None] ** -2, rtol=1e-4)
    np.testing.assert_allclose(got_b, g_bbar * (sw64 * s_x) ** -2, rtol=1e-4)


# ---------------------------------------------------------------- updates
def test_sgd_update_int8_saturates_and_rounds_half_up():
    w = np.array([[127, -128, 0, 0, 5, 5, 100, -100, 3]], np.int8)
    grad = np.array([[-1e30, 1e30, -0.5, 0.5, 1.49, -2.5, np.inf, -np.inf, 3e38]], F32)
    lr = np.array([1.0], F32)
    call = compile_te(te_backward.sgd_update_int8, w, grad, lr)
    got = call(w, grad, lr)
    np.testing.assert_array_equal(got, [[127, -128, 1, 0, 4, 8, -128, 127, -128]])
    np.testing.assert_array_equal(got, ref.sgd_update_int8(w, grad, lr))
    huge_lr = np.array([3e38], F32)  # lr*G overflows to +-inf: still a clamped step, never a wrap
    np.testing.assert_array_equal(call(w, grad, huge_lr), ref.sgd_update_int8(w, grad, huge_lr))


def test_sgd_update_int32_saturates_at_the_int32_limits():
    b = np.array([INT32_MAX, INT32_MIN, INT32_MAX - 3, INT32_MIN + 3, 0, 0, 7, -7], np.int32)
    grad = np.array([-1e20, 1e20, -10.0, 10.0, 3e38, -3e38, -0.5, 0.5], F32)
    lr = np.array([1.0], F32)
    got = run_te(te_backward.sgd_update_int32, b, grad, lr)
    np.testing.assert_array_equal(got, [INT32_MAX, INT32_MIN, INT32_MAX, INT32_MIN, INT32_MIN, INT32_MAX, 8, -7])
    np.testing.assert_array_equal(got, ref.sgd_update_int32(b, grad, lr))


@st.composite
def sparse_updates(draw):
    """An int8 conv weight, a (possibly strict, unsorted) channel selection on axis 0 or 1 and its gradient."""
    shape = (draw(st.integers(1, 5)), draw(st.integers(1, 5)), *(draw(st.sampled_from([1, 3])),) * 2)
    axis = draw(st.sampled_from([0, 1]))
    order = draw(st.permutations(range(shape[axis])))
    channels = tuple(order[:draw(st.integers(1, shape[axis]))])
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    w = rng.integers(-128, 128, shape).astype(np.int8)
    g_shape = list(shape)
    g_shape[axis] = len(channels)
    grad = (rng.normal(size=g_shape) * 10.0 ** rng.integers(-1, 4, g_shape)).astype(F32)
    return w, grad, np.array([draw(st.floats(1e-3, 10.0))], F32), axis, channels


@given(sparse_updates())
@SETTINGS
def test_sgd_update_int8_sparse_channels(case):
    w, grad, lr, axis, channels = case
    got = run_te(lambda a, b, c: te_backward.sgd_update_int8(a, b, c, axis, channels), w, grad, lr)
    np.testing.assert_array_equal(got, ref.sgd_update_int8(w, grad, lr, axis, channels))
    untouched = [c for c in range(w.shape[axis]) if c not in channels]
    np.testing.assert_array_equal(np.take(got, untouched, axis=axis), np.take(w, untouched, axis=axis))
    updated = np.take(got, list(channels), axis=axis).astype(np.int64)
    exact = np.floor(np.take(w, list(channels), axis=axis) - lr[0].astype(np.float64) * grad.astype(np.float64) + 0.5)
    assert np.all(np.abs(updated - np.clip(exact, -128, 127)) <= 1)  # float32 lr*G may round across a half


@given(conv_grad_cases(), st.integers(0, 2**31), st.sampled_from(VARIANTS))
@settings(max_examples=15, deadline=None)
def test_weight_grad_sgd_is_the_gradient_then_the_update_in_place(case, seed, variant):
    """FuseWeightUpdate's kernel, as the pass schedules it: the bits of the numpy weight gradient, then its int8 SGD
    update, also when its output is its own weight buffer (the C step runs it in place)."""
    x, g, w, stride, groups, channels = (case[key] for key in ("x", "g", "w", "stride", "groups", "channels"))
    rng = np.random.default_rng(seed)
    dw = channels if groups > 1 else None
    w_sel = np.ascontiguousarray(w[list(channels)] if dw else w[:, list(channels)])
    x_sel, k, zx = ref.gather_channels(x, channels), w.shape[2], case["x_zero"]
    scale = rng.uniform(0.1, 10.0, w_sel.shape[0]).astype(F32)
    lr = np.array([rng.uniform(1e-3, 0.1)], F32)
    want = ref.sgd_update_int8(w_sel, ref.conv2d_weight_grad(x_sel, g, zx, stride, k, scale, dw), lr)
    assume((want != w_sel).any())
    phs = [te.placeholder(a.shape, str(a.dtype), f"in{i}") for i, a in enumerate((w_sel, x_sel, g, scale, lr))]
    with kernel_variant(variant):
        func = compact_schedule(te.create_prim_func([*phs, te_backward.conv2d_weight_grad_sgd(*phs, zx, stride, k, dw)]))
    def compiled(f):
        return tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": f})), target="llvm")

    weight, out = tvm.runtime.tensor(w_sel), tvm.runtime.empty(w_sel.shape, "int8")
    operands = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (x_sel, g, scale, lr)]
    compiled(func)(weight, *operands, out)
    np.testing.assert_array_equal(out.numpy(), want)
    compiled(func.without_attr("tirx.noalias"))(weight, *operands, weight)  # in place, as the C codegen compiles it
    np.testing.assert_array_equal(weight.numpy(), want)


@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31))
@SETTINGS
def test_float_updates_and_accumulation(n, c, seed):
    rng = np.random.default_rng(seed)
    w, grad = rng.normal(size=(n, c)).astype(F32), rng.normal(size=(n, c)).astype(F32)
    lr = np.array([rng.uniform(0, 1)], F32)
    assert_same(run_te(te_backward.sgd_update_f32, w, grad, lr), ref.sgd_update_f32(w, grad, lr))
    assert_same(run_te(te_backward.add_f32, w, grad), ref.add_f32(w, grad))


# ---------------------------------------------------------------- head
@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7), st.integers(0, 2**31))
@SETTINGS
def test_global_avg_pool_grad(n, c, h, w, seed):
    g = np.random.default_rng(seed).normal(size=(n, c)).astype(F32)
    got = run_te(lambda a: te_backward.global_avg_pool_grad(a, h, w), g)
    assert_same(got, ref.global_avg_pool_grad(g, h, w))
    want = central_diff(lambda x: np.sum(g.astype(np.float64) * x.mean(axis=(2, 3))), np.zeros((n, c, h, w)), 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 6), st.integers(-128, 127), st.floats(0.005, 0.5), st.integers(0, 2**31))
@SETTINGS
def test_linear_float_forward_and_grads(n, i, o, x_zero, x_scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (n, i)).astype(np.int8)
    w = rng.normal(size=(o, i)).astype(F32)
    g = rng.normal(size=(n, o)).astype(F32)
    bias = rng.normal(size=o).astype(F32)
    logits = run_te(lambda a, b, c: te_kernels.linear_float(a, b, c, x_zero, x_scale), x, w, bias)
    assert_same(logits, reference.linear_float(x, x_zero, x_scale, w, bias))
    got = run_te(lambda a, b, c: te_backward.linear_float_grads(a, x_zero, x_scale, b, c), x, w, g)
    for a, b in zip(got, ref.linear_float_grads(x, x_zero, x_scale, w, g)):
        assert_same(a, b)
    x_real = (x.astype(F32) - F32(x_zero)) * F32(x_scale)
    g64 = g.astype(np.float64)

    def loss(xr, wr, br):
        return np.sum(g64 * (xr @ wr.T + br))

    want = (central_diff(lambda v: loss(v, w, 0.0), x_real, 1.0), central_diff(lambda v: loss(x_real, v, 0.0), w, 1.0),
            central_diff(lambda v: loss(x_real, w, v), np.zeros(o), 1.0))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(initial=1.0))


# ---------------------------------------------------------------- softmax cross-entropy
def test_exp_f32_is_bit_exact_and_within_two_ulp():
    rng = np.random.default_rng(3)
    x = np.concatenate([np.linspace(-87, 0, 400001, dtype=F32), rng.uniform(-87, 0, 200000).astype(F32),
                        F32([-87, -86.99999, -1e-30, -0.0, 0.0, -0.34657359, -0.34657362, -0.6931472])])
    got = ref.exp_f32(x)
    want = np.exp(x.astype(np.float64))
    assert np.all(np.abs(got - want) <= 2 * np.spacing(want.astype(F32)).astype(np.float64))
    outside = F32([-200, -88, 1, 50])  # clamped to [-87, 0]
    np.testing.assert_array_equal(ref.exp_f32(outside), ref.exp_f32(F32([-87, -87, 0, 0])))
    both = np.concatenate([x, outside])
    assert_same(run_te(lambda a: te.compute(a.shape, lambda j: te_backward.exp_f32(a[j]), name="exp"), both), ref.exp_f32(both))


@st.composite
def logits_cases(draw):
    n, k = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    z = (rng.normal(size=(n, k)) * draw(st.sampled_from([0.1, 3.0, 40.0]))).astype(F32)
    return z, rng.integers(0, k, n).astype(np.int32)


@given(logits_cases())
@SETTINGS
def test_softmax_cross_entropy(case):
    z, label = case
    loss, g = run_te(te_backward.softmax_cross_entropy, z, label)
    want_loss, want_g = ref.softmax_cross_entropy(z, label)
    assert_same(g, want_g)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    n = z.shape[0]

    def ce(v):
        v = v - v.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(v).sum(axis=1)) - v[np.arange(n), label])

    z64 = z.astype(np.float64)
    np.testing.assert_allclose(loss[0], ce(z64), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, central_diff(ce, z64, 1e-6), atol=2e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_sparse_weight_grad_feeds_sparse_update(axis):
    """The channel layouts agree: a depthwise (axis 0) or groups-1 (axis 1) weight gradient of a selection
    updates exactly those channels of the full weight."""
    rng = np.random.default_rng(axis)
    channels = (2, 0)
    x = rng.integers(-128, 128, (1, 3, 5, 5)).astype(np.int8)
    w = rng.integers(-128, 128, (3, 1, 3, 3) if axis == 0 else (4, 3, 3, 3)).astype(np.int8)
    g = rng.normal(size=(1, w.shape[0], 5, 5)).astype(F32)
    dw = channels if axis == 0 else None
    x_sel = ref.gather_channels(x, channels)
    grad = ref.conv2d_weight_grad(x_sel, g, 0, 1, 3, np.ones(len(channels) if dw else w.shape[0], F32), dw)
    lr = np.array([0.01], F32)
    got = run_te(lambda a, b, c: te_backward.sgd_update_int8(a, b, c, axis, channels), w, grad, lr)
    full = ref.conv2d_weight_grad(x, g, 0, 1, 3, np.ones(3 if dw else w.shape[0], F32), tuple(range(3)) if dw else None)
    want = w.copy()
    sel = (slice(None),) * axis + (list(channels),)
    want[sel] = ref.sgd_update_int8(w, full, lr)[sel]
    np.testing.assert_array_equal(got, want)


@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from([0, 1]), st.integers(0, 2**31))
@SETTINGS
def test_merge_channels(o, c, axis, seed):
    rng = np.random.default_rng(seed)
    frozen = rng.integers(-128, 128, (o, c, 3, 3)).astype(np.int8)
    size = frozen.shape[axis]
    channels = tuple(int(v) for v in rng.permutation(size)[: int(rng.integers(1, size + 1))])
    trained_shape = list(frozen.shape)
    trained_shape[axis] = len(channels)
    trained = rng.integers(-128, 128, trained_shape).astype(np.int8)
    got = run_te(lambda f, t: te_backward.merge_channels(f, t, axis, channels), frozen, trained)
    np.testing.assert_array_equal(got, ref.merge_channels(frozen, trained, axis, channels))
    np.testing.assert_array_equal(np.take(got, channels, axis=axis), trained)
    rest = [k for k in range(size) if k not in channels]
    np.testing.assert_array_equal(np.take(got, rest, axis=axis), np.take(frozen, rest, axis=axis))


def projection_mask_bytes(rng, n: int) -> np.ndarray:
    """A packed clamp mask of ``n`` elements: half its bytes all set (a projection rarely saturates, and the fused
    kernels read such a byte's 8 pixels without a test each), the others random bits."""
    nbytes = (n + 7) // 8
    return np.where(rng.random(nbytes) < 0.5, 255, rng.integers(0, 256, nbytes)).astype(np.uint8)


@given(st.sampled_from([(8, 4, 8, 8, 3, 2, 1), (8, 4, 8, 8, 3, 2, 4), (6, 3, 7, 7, 5, 1, 3), (8, 4, 8, 8, 7, 2, 8), (8, 4, 8, 8, 7, 2, 2),
                        (5, 2, 6, 6, 3, 1, 1), (6, 4, 9, 9, 3, 3, 2), (8, 4, 4, 12, 3, 1, 4), (8, 5, 8, 8, 3, 1, 2)]),
       st.integers(0, 2**31), st.sampled_from(["frozen", "trained", "merged"]), st.sampled_from([None, 3, 8]), st.booleans(),
       st.booleans(), st.booleans(), st.sampled_from(VARIANTS))
@settings(max_examples=40, deadline=None)
def test_depthwise_block_backward_is_the_separate_kernels(shape, seed, expansion, projection, input_grad, masked_front, update_biases,
                                                         variant):
    """The fused TIR kernel (planes built ``tile`` channels at a time, in either variant) == depthwise input grad -> mask -> bias grad +
    1x1 input grad of the numpy reference, bit for bit; ``trained``: also the expansion's weight gradient and SGD step,
    each row after its old value was read; ``merged``: trained on some input channels only (SparseUpdate's merge of a
    frozen weight and a trained slice, the slice updated); ``projection``: starting from the output gradient of a 1x1
    projection of that many channels (its input gradient -> the depthwise clamp's mask -> the depthwise bias gradient
    first); without ``input_grad`` (where the backward stops) the same minus the expansion's input gradient (a merged
    slice is then the whole weight the kernel sees); with ``masked_front`` (and ``projection``) that output gradient is
    read through the projection's clamp mask, == the reference's masked copy; with ``update_biases`` the bias gradients
    give way to the biases after the reference's SGD step (``sgd_update_int32``)."""
    from tvm_tinytrain.ops import dsp
    from tvm_tinytrain.ops.tir_backward import depthwise_block_backward

    c, cin, h, w, k, stride, tile = shape
    pad = (k - 1) // 2
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    rng = np.random.default_rng(seed)
    w_dw, w_pw = (rng.integers(-128, 128, s).astype(np.int8) for s in ((c, 1, k, k), (c, cin, 1, 1)))
    s_dw, s_pw = (rng.uniform(1e-3, 1e-2, c).astype(np.float32) for _ in range(2))
    mask = rng.integers(0, 256, ((c * h * w + 7) // 8,)).astype(np.uint8)
    # A bias moves only where lr * its gradient reaches 1/2: larger scales when the kernel applies the steps itself.
    bias_scale = np.float32(1000 if update_biases else 1)
    b_scale = rng.uniform(1, 100, c).astype(np.float32) * bias_scale
    x = rng.integers(-128, 128, (1, cin, h, w)).astype(np.int8)
    x_zero, w_scale, lr = int(rng.integers(-128, 128)), rng.uniform(1, 1e3, c).astype(np.float32), np.array([0.01], np.float32)
    trained, merged, w_eff, x_train, frozen = expansion != "frozen", None, w_pw, x, []
    if expansion == "merged" and input_grad:  # w_pw is then the trained slice of the channels in ``merged``
        merged = tuple(int(v) for v in sorted(rng.choice(cin, size=max(1, cin // 2), replace=False)))
        frozen = [rng.integers(-128, 128, (c, cin, 1, 1)).astype(np.int8)]
        w_pw = rng.integers(-128, 128, (c, len(merged), 1, 1)).astype(np.int8)
        w_eff, x_train = ref.merge_channels(frozen[0], w_pw, 1, merged), x[:, list(merged)]
    if projection is None:
        g = rng.normal(size=(1, c, ho, wo)).astype(np.float32)
        front = [g]
    else:
        g_out = rng.normal(size=(1, projection, ho, wo)).astype(np.float32)
        w_proj = rng.integers(-128, 128, (projection, c, 1, 1)).astype(np.int8)
        s_proj = rng.uniform(1e-3, 1e-2, projection).astype(np.float32)
        mask_dw = rng.integers(0, 256, ((c * ho * wo + 7) // 8,)).astype(np.uint8)
        b_scale_dw = rng.uniform(1, 100, c).astype(np.float32) * bias_scale
        g_mask = [projection_mask_bytes(rng, g_out.size)] if masked_front else []
        front = [g_out, *g_mask, w_proj, s_proj, mask_dw, b_scale_dw]
        g_out = ref.apply_mask(g_out, g_mask[0]) if masked_front else g_out
        g = ref.apply_mask(ref.conv2d_input_grad(g_out, w_proj, s_proj, (1, c, ho, wo), 1, 1), mask_dw)
    with kernel_variant(variant):  # the optimized one sums a few plane pixels at a time
        kernel = depthwise_block_backward(c, cin, h, w, ho, wo, k, stride, x_zero if trained else None, tile, projection, merged,
                                          input_grad=input_grad, masked_front=masked_front and projection is not None,
                                          update_biases=update_biases)
    fn = tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")})), target="llvm")
    g_x, w_new = tvm.runtime.empty([1, cin, h, w], "float32"), tvm.runtime.empty(w_pw.shape, "int8")
    bias_type = "int32" if update_biases else "float32"
    g_b, g_b_dw = (tvm.runtime.empty([c], bias_type) for _ in range(2))
    outs = [*([w_new] if trained else []), *([g_x] if input_grad else []), g_b, *([g_b_dw] if projection else [])]
    pw = [s_pw] if input_grad else []  # the expansion's scale (and an untrained weight) only serve the input gradient
    biases = [rng.integers(-2**31, 2**31, c, dtype=np.int64).astype(np.int32) for _ in range(1 + bool(projection))]
    biases[0][:2] = [2**31 - 1, -2**31]  # saturating steps at both ends
    lr_b = np.array([0.5], np.float32)  # a bias gradient is about b_scale * plane sum: steps of tens of units
    if trained:
        extra = [b_ * 1 for b_ in biases] if update_biases else []
        fn(*[tvm.runtime.tensor(a) for a in (w_pw, *front, w_dw, s_dw, mask, b_scale, *pw, x_train, w_scale, lr, *frozen, *extra)], *outs)
        lr_b = lr
    else:
        extra = [lr_b, *biases] if update_biases else []
        fn(*[tvm.runtime.tensor(a) for a in (*front, w_dw, s_dw, mask, b_scale, *([w_pw] if input_grad else []), *pw, *extra)], *outs)
    masked = ref.apply_mask(ref.conv2d_input_grad(g, w_dw, s_dw, (1, c, h, w), stride, c), mask)
    want_b = [ref.bias_grad(masked, b_scale), *([ref.bias_grad(g, b_scale_dw)] if projection else [])]
    if update_biases:
        want_b = [ref.sgd_update_int32(b_, gb, lr_b) for b_, gb in zip(biases, want_b)]
        assert (want_b[0] != biases[0]).any()
    np.testing.assert_array_equal(g_b.numpy(), want_b[0])
    if projection:
        np.testing.assert_array_equal(g_b_dw.numpy(), want_b[1])
    if input_grad:
        np.testing.assert_array_equal(g_x.numpy(), ref.conv2d_input_grad(masked, w_eff, s_pw, (1, cin, h, w), 1, 1))
    if trained:
        want = ref.sgd_update_int8(w_pw, ref.conv2d_weight_grad(x_train, masked, x_zero, 1, 1, w_scale), lr)
        np.testing.assert_array_equal(w_new.numpy(), want)
        assert (want != w_pw).any()  # the steps are large enough to move weights


@given(st.sampled_from([(12, 4, 8, 6, 5, 4), (12, 4, 8, 6, 5, 2), (6, 3, 6, 5, 3, 1), (6, 3, 6, 5, 3, 3), (8, 4, 7, 4, 7, 7),
                        (9, 2, 9, 3, 7, 3), (8, 4, 4, 4, 3, 4), (8, 4, 8, 8, 5, 2), (6, 3, 4, 16, 3, 2)]),
       st.integers(0, 2**31), st.booleans(), st.booleans(), st.booleans())
@settings(max_examples=30, deadline=None)
def test_residual_block_backward_is_the_fused_kernel_then_the_skip_add(shape, seed, masked_front, update_biases, in_place):
    """The banded residual block backward == the numpy reference of the separate kernels (the projection's input
    gradient, the depthwise clamp, the depthwise and expansion input gradients, the expansion clamp, both bias
    gradients or their SGD steps) plus the skip path's ``add_f32``, bit for bit, whether its output is a separate
    buffer or ``g`` itself (``in_place``, as the C step runs it when ``g`` dies there); bands of 1 row up to the
    whole plane, as many rows as the depthwise kernel reaches or more; rows of 8 and 16 pixels, whose mask bytes
    (half of them all set) the kernel tests once for 8 pixels."""
    from tvm_tinytrain.ops import dsp
    from tvm_tinytrain.ops.tir_backward import residual_block_backward

    c, width, h, w, k, band = shape
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(1, width, h, w)).astype(np.float32)
    g_mask = projection_mask_bytes(rng, g.size)
    w_proj, w_dw, w_pw = (rng.integers(-128, 128, s).astype(np.int8) for s in ((width, c, 1, 1), (c, 1, k, k), (c, width, 1, 1)))
    s_proj = rng.uniform(1e-3, 1e-2, width).astype(np.float32)
    s_dw, s_pw = (rng.uniform(1e-3, 1e-2, c).astype(np.float32) for _ in range(2))
    mask_dw, mask = (rng.integers(0, 256, ((c * h * w + 7) // 8,)).astype(np.uint8) for _ in range(2))
    bias_scale = np.float32(1000 if update_biases else 1)  # large enough for the steps to move the biases
    b_scale_dw, b_scale = (rng.uniform(1, 100, c).astype(np.float32) * bias_scale for _ in range(2))
    lr = np.array([0.5], np.float32)
    biases = [rng.integers(-2**31, 2**31, c, dtype=np.int64).astype(np.int32) for _ in range(2)]
    biases[0][:2] = [2**31 - 1, -2**31]

    g_proj = ref.apply_mask(g, g_mask) if masked_front else g
    g_dw = ref.apply_mask(ref.conv2d_input_grad(g_proj, w_proj, s_proj, (1, c, h, w), 1, 1), mask_dw)
    masked = ref.apply_mask(ref.conv2d_input_grad(g_dw, w_dw, s_dw, (1, c, h, w), 1, c), mask)
    want_sum = ref.add_f32(g, ref.conv2d_input_grad(masked, w_pw, s_pw, (1, width, h, w), 1, 1))
    want_b = [ref.bias_grad(masked, b_scale), ref.bias_grad(g_dw, b_scale_dw)]
    if update_biases:
        want_b = [ref.sgd_update_int32(b, gb, lr) for b, gb in zip(biases, want_b)]
        assert (want_b[0] != biases[0]).any()

    kernel = residual_block_backward(c, width, h, w, k, band, masked_front, update_biases)
    kernel = kernel.with_attrs({"global_symbol": "main", "tirx.noalias": False})  # g_sum may be g
    fn = tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": kernel})), target="llvm")
    g_in = tvm.runtime.tensor(g)
    g_sum = g_in if in_place else tvm.runtime.empty(list(g.shape), "float32")
    outs = [g_sum, *(tvm.runtime.empty([c], "int32" if update_biases else "float32") for _ in range(2))]
    args = [g_in, *([g_mask] if masked_front else []), w_proj, s_proj, mask_dw, b_scale_dw, w_dw, s_dw, mask, b_scale, w_pw, s_pw,
            *([lr, *biases] if update_biases else [])]
    fn(*[a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(a) for a in args], *outs)
    assert_same(g_sum.numpy(), want_sum)
    for got, want in zip(outs[1:], want_b):
        np.testing.assert_array_equal(got.numpy(), want)


def test_residual_block_backward_rejects_a_band_that_cannot_overwrite_its_input():
    from tvm_tinytrain.ops.tir_backward import residual_block_backward

    for band in (0, 3, 1):  # 0 rows; 3 does not divide 8; 1 row is less than a 5x5 kernel's reach of 2
        with pytest.raises(TinyTrainError, match=f"band of {band} rows"):
            residual_block_backward(12, 4, 8, 6, 5, band)


@given(st.sampled_from([(8, 4, 8, 8, 3, 2, 4), (6, 4, 7, 8, 5, 1, 3), (8, 8, 4, 4, 3, 1, 8), (4, 3, 6, 6, 3, 2, 1), (4, 4, 5, 4, 7, 2, 2)]),
       st.integers(0, 2**31), st.sampled_from(VARIANTS), st.booleans(), st.booleans())
@settings(max_examples=20, deadline=None)
def test_depthwise_block_backward_recomputes_the_forward_masks(shape, seed, variant, wide, update_biases):
    """With ``recompute`` the kernel takes the biases and requantization of the expansion and the depthwise conv
    instead of their clamp masks, and rebuilds each channel's masks from its input ``x``: the same bits as the
    mask-taking kernel given the masks of the numpy forward (in the optimized variant, through the DSP expansion
    where the shape fits; with the wide-shift requantization when ``wide``); with ``update_biases`` both update the
    biases the recomputation reads."""
    from tvm_tinytrain.ops import dsp
    from tvm_tinytrain.ops.constants import Requant
    from tvm_tinytrain.ops.tir_backward import depthwise_block_backward
    from tvm_tinytrain.quant import quantize_multipliers

    c, cin, h, w, k, stride, tile = shape
    pad, projection = (k - 1) // 2, 5
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (1, cin, h, w)).astype(np.int8)
    # Rescales below 1/4 take the wide-shift steps (shifts >= 33); above, small weights keep outputs in range.
    w_max = 128 if wide else 3
    w_pw, w_dw = (rng.integers(-w_max, w_max, s).astype(np.int8) for s in ((c, cin, 1, 1), (c, 1, k, k)))
    x_zero = int(rng.integers(-20, 20))
    convs, rqs = [], []
    for zero, taps in ((x_zero, cin), (None, k * k)):
        scale = rng.uniform(0.5, 2.0, c) * 150 / (np.sqrt(taps) * 128 * 74) if wide else rng.uniform(0.3, 1.0, c)
        mult, shift = quantize_multipliers(scale)
        rq = Requant(mult, shift, int(rng.integers(-30, 30)), int(rng.integers(-128, -60)), int(rng.integers(60, 128)))
        rqs.append((rng.integers(-3000, 3000, c).astype(np.int32) if wide else rng.integers(-50, 50, c).astype(np.int32), rq))
        convs.append({"x_zero": rqs[0][1].y_zero if zero is None else zero, "y_zero": rq.y_zero, "qmin": rq.qmin, "qmax": rq.qmax})
    (b1, rq1), (b2, rq2) = rqs
    expanded = reference.requantize(reference.conv2d_acc(x, w_pw, x_zero, 1, 1), b1, rq1)
    y_dw = reference.requantize(reference.conv2d_acc(expanded, w_dw, rq1.y_zero, stride, c), b2, rq2)
    masks = [ref.clamp_mask(expanded, rq1.qmin, rq1.qmax), ref.clamp_mask(y_dw, rq2.qmin, rq2.qmax)]
    for y, rq in ((expanded, rq1), (y_dw, rq2)):  # both kinds of bits (almost always), or the test could not tell
        assume(((y > rq.qmin) & (y < rq.qmax)).any() and ((y <= rq.qmin) | (y >= rq.qmax)).any())
    g_out = rng.normal(size=(1, projection, ho, wo)).astype(np.float32)
    w_proj = rng.integers(-128, 128, (projection, c, 1, 1)).astype(np.int8)
    s_proj, s_dw, s_pw = (rng.uniform(1e-3, 1e-2, n).astype(np.float32) for n in (projection, c, c))
    b_scale_dw, b_scale, w_scale = (rng.uniform(1, 100, c).astype(np.float32) for _ in range(3))
    lr = np.array([1.0], np.float32)  # steps large enough to move the small weights
    wide_flags = tuple(wide and int(rq.shift.min()) >= 33 for _, rq in rqs)
    assert wide_flags == (wide, wide)
    with kernel_variant(variant):
        kernels = [depthwise_block_backward(c, cin, h, w, ho, wo, k, stride, x_zero, tile, projection, None, recompute,
                                            update_biases=update_biases)
                   for recompute in (None, (*convs, *wide_flags))]
    if variant == "reference":  # the reference kernels define correctness in plain C: no DSP helper
        assert not any(name in kernel.script() for kernel in kernels for name in dsp.NAMES)
    inputs = [[w_pw, g_out, w_proj, s_proj, masks[1], b_scale_dw, w_dw, s_dw, masks[0], b_scale, s_pw, x, w_scale, lr,
               *([b1, b2] if update_biases else [])],
              [w_pw, g_out, w_proj, s_proj, b_scale_dw, w_dw, s_dw, b_scale, s_pw, x, w_scale, lr, b1, rq1.mult, rq1.shift, b2,
               rq2.mult, rq2.shift]]
    results = []
    for kernel, args in zip(kernels, inputs):
        fn = tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")})), target="llvm")
        bias_type = "int32" if update_biases else "float32"
        outs = [tvm.runtime.empty(s, d) for s, d in ((w_pw.shape, "int8"), ([1, cin, h, w], "float32"), ([c], bias_type), ([c], bias_type))]
        fn(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], *outs)
        results.append([o.numpy() for o in outs])
    for want, got in zip(*results):
        np.testing.assert_array_equal(got, want)
    assert (results[0][0] != w_pw).any()


@given(st.sampled_from([(6, 5, 4, 4), (8, 3, 3, 5), (1, 1, 1, 1), (12, 8, 2, 8), (4, 3, 3, 2)]), st.integers(0, 2**31), st.booleans(),
       st.sampled_from(VARIANTS))
@SETTINGS
def test_projection_bias_grad_is_the_separate_kernels(shape, seed, masked_input, variant):
    """A 1x1 projection's input gradient -> the clamp mask of the conv it reads -> that conv's bias gradient, one plane
    at a time (a group of planes in the optimized variant: 2 or 4 here): the numpy reference's three kernels, bit for
    bit; with ``masked_input`` the projection's output gradient read through its own clamp mask == the reference's
    masked copy."""
    from tvm_tinytrain.ops.tir_backward import projection_bias_grad

    c, projection, h, w = shape
    rng = np.random.default_rng(seed)
    g_out = rng.normal(size=(1, projection, h, w)).astype(np.float32)
    w_proj = rng.integers(-128, 128, (projection, c, 1, 1)).astype(np.int8)
    s_proj = rng.uniform(1e-3, 1e-2, projection).astype(np.float32)
    mask = rng.integers(0, 256, ((c * h * w + 7) // 8,)).astype(np.uint8)
    b_scale = rng.uniform(1, 100, c).astype(np.float32)
    with kernel_variant(variant):
        prim = projection_bias_grad(c, projection, h, w, masked_input)
    fn = tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}), target="llvm")
    got = tvm.runtime.empty([c], "float32")
    g_mask = [projection_mask_bytes(rng, g_out.size)] if masked_input else []
    fn(*[tvm.runtime.tensor(a) for a in (g_out, *g_mask, w_proj, s_proj, mask, b_scale)], got)
    g = ref.apply_mask(g_out, g_mask[0]) if masked_input else g_out
    want = ref.bias_grad(ref.apply_mask(ref.conv2d_input_grad(g, w_proj, s_proj, (1, c, h, w), 1, 1), mask), b_scale)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("out_channels, fits", [(8, True), (300, False)])
def test_input_grad_stages_real_weights_only_in_the_optimized_schedule(out_channels, fits):
    """The optimized schedule computes ``float(w) * scale`` once per tile of input channels into a workspace buffer, when
    that fits :data:`MAX_STAGE_BYTES` (300 output channels x 4 do not); the reference inlines it.  Same bits."""
    rng = np.random.default_rng(0)
    g = rng.normal(size=(1, out_channels, 4, 4)).astype(F32)
    w = rng.integers(-128, 128, (out_channels, 8, 1, 1)).astype(np.int8)
    s = rng.uniform(0.001, 0.1, out_channels).astype(F32)
    want = ref.conv2d_input_grad(g, w, s, (1, 8, 4, 4), 1, 1)
    phs = [te.placeholder(a.shape, str(a.dtype), f"in{i}") for i, a in enumerate((g, w, s))]
    out = te_backward.conv2d_input_grad(*phs, (1, 8, 4, 4), 1, 1)
    for variant in VARIANTS:
        with kernel_variant(variant):
            func = compact_schedule(te.create_prim_func([*phs, out]))
        assert ("w_real" in func.script()) == (variant == "optimized" and fits)
        got = tvm.runtime.empty(want.shape, "float32")
        tvm.compile(func, target="llvm")(*[tvm.runtime.tensor(a) for a in (g, w, s)], got)
        assert_same(got.numpy(), want)
