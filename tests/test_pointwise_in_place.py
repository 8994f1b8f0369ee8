"""PointwiseInPlace: the column-staged 1x1 kernel against numpy, the rewrite, and the plan that puts it in place.

The generated C of the random model's bias-only:6 (reference) and bias-only:2/optimized steps runs b0.project in
place over its operand; test_codegen.py checks those steps against the Python trainer bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import make_random_model
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from relax_passes import memory_plan
from relax_passes._buffers import Buffer
from relax_passes._ir import KernelCall, decode
from relax_passes.plan_memory import PLACEMENT_ORDERS, _place, assign_offsets, live_floor, validate_plan
from relax_passes.pointwise_in_place import pointwise_in_place
from tvm_tinytrain.ops import dsp, reference
from tvm_tinytrain.ops.constants import Requant
from tvm_tinytrain.ops.schedule import kernel_variant
from tvm_tinytrain.quant import quantize_multipliers
from tvm_tinytrain.trainer import build_training_module


def _call(x, wt, bias, rq, x_zero) -> KernelCall:
    """A conv2d_requant call on Relax vars of the arrays' types (what the kernel builder reads)."""
    def var(name, a):
        return relax.Var(name, relax.TensorType(a.shape, str(a.dtype)))

    attrs = {"x_zero": x_zero, "y_zero": rq.y_zero, "qmin": rq.qmin, "qmax": rq.qmax, "stride": 1, "groups": 1}
    args = [var("x", x), var("w", wt), var("b", bias), var("m", rq.mult), relax.const(rq.shift)]
    out = var("y", np.empty((1, wt.shape[0], *x.shape[2:]), np.int8))
    return KernelCall(out, "conv2d_requant", attrs, args, None)


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31), st.sampled_from(["reference", "optimized"]))
@settings(max_examples=25, deadline=None)
def test_pointwise_in_place_kernel_matches_reference(ic, oc, h, w, seed, variant):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (1, ic, h, w)).astype(np.int8)
    wt = rng.integers(-128, 128, (oc, ic, 1, 1)).astype(np.int8)
    bias = rng.integers(-50000, 50000, oc).astype(np.int32)
    mult, shift = quantize_multipliers(rng.uniform(1e-3, 2.0, oc))
    rq = Requant(mult, shift, int(rng.integers(-128, 128)), -128, 127)
    x_zero = int(rng.integers(-128, 128))
    want = reference.requantize(reference.conv2d_acc(x, wt, x_zero, 1, 1), bias, rq)
    with kernel_variant(variant):
        func = pointwise_in_place(_call(x, wt, bias, rq, x_zero))
    fn = tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": func.with_attr("global_symbol", "main")})), target="llvm")
    out = tvm.runtime.empty(want.shape, "int8")
    fn(*[tvm.runtime.tensor(a) for a in (x, wt, bias, rq.mult, rq.shift)], out)
    np.testing.assert_array_equal(out.numpy(), want)


def test_plan_puts_an_output_flush_with_its_operands_end_when_its_start_is_taken():
    """MCUNet's blocks 1-2 in small: block 1's projection ``p`` overwrites its expansion ``e`` and is kept for the
    residual while block 2's wider expansion ``e2`` needs 48 bytes.  Over ``e``'s first bytes ``p`` would collide
    with ``e2``; flush with ``e``'s end it does not, and the arena is the 64 bytes alive at once (placing the
    largest first; another order finds 64 bytes without the tail, which is why PlanMemory tries several)."""
    def plan(tail_ok, place):
        buffers = [Buffer("x", 32, 2, 3, "activation"), Buffer("e", 32, 3, 4, "activation"),
                   Buffer("p", 16, 4, 8, "activation", overwrites=1, tail_ok=tail_ok), Buffer("e2", 48, 5, 6, "activation")]
        arena = place(buffers, 1)
        validate_plan(buffers)
        return arena, buffers

    def largest_first(buffers, alignment):
        return _place(buffers, alignment, PLACEMENT_ORDERS["largest first"])

    arena, buffers = plan(True, largest_first)
    assert arena == 64 and buffers[2].offset == buffers[1].offset + 16 and buffers[2].in_place(buffers)
    assert plan(False, largest_first)[0] == 80
    assert plan(False, assign_offsets)[0] == plan(True, assign_offsets)[0] == 64


def test_placement_search_reaches_the_bytes_alive_at_once_where_the_greedy_orders_do_not():
    """Six lifetimes on which every greedy order leaves a 16-byte gap (144 bytes) although 128 are alive at most:
    the local search over orders finds a 128-byte placement, which the validator accepts, and stops there."""
    def buffers():
        return [Buffer(n, size, start, end, "activation") for n, size, start, end in
                (("b0", 64, 0, 3), ("b1", 32, 4, 4), ("b2", 48, 3, 6), ("b3", 16, 5, 6), ("b4", 48, 4, 7), ("b5", 48, 0, 1))]

    assert {_place(buffers(), 16, key) for key in PLACEMENT_ORDERS.values()} == {144}
    assert assign_offsets(buffers(), 16) == 144  # no search steps: the greedy orders alone
    searched = buffers()
    assert live_floor(searched) == 128 and assign_offsets(searched, 16, search_steps=2000) == 128
    validate_plan(searched)


@pytest.mark.parametrize("scheme, kernels", [("bias-only:6", "reference"), ("bias-only:2", "optimized")])
def test_projection_runs_in_place_over_its_dying_operand(scheme, kernels):
    mod = build_training_module(make_random_model(3), scheme, num_classes=4, kernels=kernels)
    calls = [decode(mod, b) for b in mod["train_step"].body.blocks[0].bindings]
    project = next(c for c in calls if c is not None and c.node == "b0.project" and c.op in ("conv2d_requant", "pointwise_in_place"))
    assert project.op == "pointwise_in_place"
    assert not [c for c in calls if c is not None and c.op == "pointwise_in_place" and c.node == "b1.project"]  # 8 -> 12: wider
    plan = memory_plan(mod)
    out = next(b for b in plan.buffers if b["name"] == project.var.name)
    operand = plan.buffers[out["overwrites"]]
    assert out["offset"] in (operand["offset"], operand["offset"] + operand["size"] - out["size"])
    assert out["size"] < operand["size"] and operand["end"] == out["start"]


def test_projection_stays_when_its_operand_is_saved():
    """Under ``full`` b0.project's weight gradient reads its input, which then outlives the conv: no in-place kernel."""
    mod = build_training_module(make_random_model(3), "full", num_classes=4)
    assert not [b for b in mod["train_step"].body.blocks[0].bindings if (c := decode(mod, b)) is not None and c.op == "pointwise_in_place"]
