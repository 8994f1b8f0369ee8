"""DepthwiseInPlace's kernels on their own: numpy's bits, also when the output is the operand's own buffer.

The whole-step tests run these kernels inside training steps (test_training.py against the numpy reference, the
generated C against the trainer in test_codegen.py, on the planned arena); here each kernel is called directly, in
both variants, with the output in a buffer of its own and then over its operand from its first byte (a stride-2
conv's smaller output too), the way the C step calls it.
"""

from __future__ import annotations

import numpy as np
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from relax_passes._ir import KernelCall
from relax_passes.depthwise_in_place import _conv_requant, _input_grad
from tvm_tinytrain.ops import dsp, reference
from tvm_tinytrain.ops import reference_backward as ref
from tvm_tinytrain.ops.constants import Requant
from tvm_tinytrain.ops.schedule import VARIANTS, kernel_variant
from tvm_tinytrain.quant import quantize_multipliers

MAX_PLANE = 5120  # the option's default: every plane here is staged


def _var(name: str, a: np.ndarray) -> relax.Var:
    return relax.Var(name, relax.TensorType(a.shape, str(a.dtype)))


def _compile(func):
    return tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": func.with_attr("global_symbol", "main")})), target="llvm")


def _run_both_ways(func, operand: np.ndarray, rest: list, out_shape, out_dtype):
    """The kernel's output in its own buffer, then written over its operand's buffer from its first byte, as PlanMemory
    places it (a strided conv's smaller output too).  Over it, the kernel is compiled without ``tirx.noalias``, as the
    C codegen does for every in-place kernel (``pointer_form``): with it, llvm may read the operand where the kernel
    reads its staged copy."""
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in rest]
    out = tvm.runtime.empty(out_shape, out_dtype)
    _compile(func)(tvm.runtime.tensor(operand), *tensors, out)
    shared = tvm.runtime.tensor(operand)
    over = shared._create_view(tuple(out_shape), out_dtype)  # the operand's storage, from its start
    _compile(func.without_attr("tirx.noalias"))(shared, *tensors, over)
    return [out.numpy(), over.numpy()]


@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), st.sampled_from([3, 5, 7]), st.sampled_from([1, 2]),
       st.integers(0, 2**31), st.sampled_from(VARIANTS))
@settings(max_examples=20, deadline=None)
def test_depthwise_in_place_kernel(c, h, w, k, stride, seed, variant):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (1, c, h, w)).astype(np.int8)
    wt = rng.integers(-128, 128, (c, 1, k, k)).astype(np.int8)
    bias = rng.integers(-5000, 5000, c).astype(np.int32)
    mult, shift = quantize_multipliers(rng.uniform(1e-3, 0.5, c))
    qmin = int(rng.integers(-128, 0))
    rq = Requant(mult, shift, int(rng.integers(-128, 128)), qmin, int(rng.integers(qmin, 128)))
    x_zero = int(rng.integers(-128, 128))
    want = reference.requantize(reference.conv2d_acc(x, wt, x_zero, stride, c), bias, rq)
    attrs = {"x_zero": x_zero, "y_zero": rq.y_zero, "qmin": rq.qmin, "qmax": rq.qmax, "stride": stride, "groups": c}
    args = [_var("x", x), _var("w", wt), _var("b", bias), _var("m", rq.mult), relax.const(rq.shift)]
    with kernel_variant(variant):
        func = _conv_requant(KernelCall(_var("y", want), "conv2d_requant", attrs, args, None), MAX_PLANE)
    for got in _run_both_ways(func, x, [wt, bias, rq.mult, rq.shift], want.shape, "int8"):
        np.testing.assert_array_equal(got, want)


@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), st.sampled_from([3, 5, 7]), st.integers(0, 2**31),
       st.sampled_from(VARIANTS))
@settings(max_examples=20, deadline=None)
def test_depthwise_input_grad_in_place_kernel(c, h, w, k, seed, variant):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(1, c, h, w)).astype(np.float32)
    wt = rng.integers(-128, 128, (c, 1, k, k)).astype(np.int8)
    scales = rng.uniform(1e-3, 0.05, c).astype(np.float32)
    want = ref.conv2d_input_grad(g, wt, scales, g.shape, 1, c)
    args = [_var("g", g), _var("w", wt), _var("s", scales)]
    with kernel_variant(variant):
        func = _input_grad(KernelCall(_var("g_x", want), "conv2d_input_grad", {"stride": 1, "groups": c}, args, None), MAX_PLANE)
    for got in _run_both_ways(func, g, [wt, scales], want.shape, "float32"):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
