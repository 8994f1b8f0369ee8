"""StreamInputRows: the band kernel against numpy, the rewrite and the plan without the image.

The whole-step equality of the generated C (which streams the image, through a row reader on odd steps and a
reader that fails) with the Python trainer is in test_codegen.py; the board runs are in test_device.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import make_random_model
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from relax_passes import StreamInputRows, memory_plan, pass_config
from relax_passes._ir import decode
from relax_passes.fuse_conv_requant import conv_requant_func
from relax_passes.stream_input_rows import row_kernel
from tvm_tinytrain.ops import dsp, reference
from tvm_tinytrain.ops.constants import Requant
from tvm_tinytrain.ops.schedule import kernel_variant
from tvm_tinytrain.quant import quantize_multipliers
from tvm_tinytrain.trainer import build_training_module


@st.composite
def conv_cases(draw):
    k = draw(st.sampled_from([1, 3, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    depthwise = draw(st.booleans())
    ic = draw(st.integers(1, 6))
    oc = ic if depthwise else 2 * draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 7)), 2 * stride * draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.integers(-128, 128, (1, ic, h, w)).astype(np.int8)
    wt = rng.integers(-128, 128, (oc, 1 if depthwise else ic, k, k)).astype(np.int8)
    bias = rng.integers(-50000, 50000, oc).astype(np.int32)
    mult, shift = quantize_multipliers([draw(st.floats(1e-3, 2.0)) for _ in range(oc)])
    qmin = draw(st.integers(-128, 0))
    rq = Requant(mult, shift, draw(st.integers(-128, 127)), qmin, draw(st.integers(qmin, 127)))
    return x, wt, bias, rq, draw(st.integers(-128, 127)), stride, ic if depthwise else 1, draw(st.sampled_from(["reference", "optimized"]))


@given(conv_cases())
@settings(max_examples=30, deadline=None)
def test_band_kernel_rows_make_the_whole_conv(case):
    """Each output row from a window of k image rows (zero-point rows past the edges) = the padded conv's row."""
    x, wt, bias, rq, x_zero, stride, groups, variant = case
    want = reference.requantize(reference.conv2d_acc(x, wt, x_zero, stride, groups), bias, rq)
    k, pad = wt.shape[2], (wt.shape[2] - 1) // 2
    attrs = {"x_zero": x_zero, "y_zero": rq.y_zero, "qmin": rq.qmin, "qmax": rq.qmax, "stride": stride, "groups": groups}
    types = [((1, x.shape[1], k, x.shape[3]), "int8"), (wt.shape, "int8"), (bias.shape, "int32"), (rq.mult.shape, "int32"),
             (rq.shift.shape, "int32")]
    with kernel_variant(variant):
        band = conv_requant_func(attrs, types, relax.const(rq.shift), pad_h=0)
    fn = tvm.compile(dsp.LowerDSPIntrinsics()(tvm.IRModule({"main": band.with_attr("global_symbol", "main")})), target="llvm")
    padded = np.full((1, x.shape[1], x.shape[2] + 2 * k, x.shape[3]), x_zero, np.int8)
    padded[:, :, k:k + x.shape[2]] = x
    got = np.empty_like(want)
    for y in range(want.shape[2]):
        first = y * stride - pad + k  # in `padded`
        out = tvm.runtime.empty((1, want.shape[1], 1, want.shape[3]), "int8")
        fn(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (padded[:, :, first:first + k], wt, bias, rq.mult, rq.shift)], out)
        got[:, :, y] = out.numpy()[:, :, 0]
    np.testing.assert_array_equal(got, want)


def _first_call(mod, name):
    return decode(mod, mod[name].body.blocks[0].bindings[0])


@pytest.mark.parametrize("kernels", ["reference", "optimized"])
def test_first_conv_streams_and_leaves_the_arena(kernels):
    model = make_random_model(3, size=32)
    mod = build_training_module(model, "last-k:3", kernels=kernels)
    with pass_config(stream_input=False):
        whole = build_training_module(model, "last-k:3", kernels=kernels)
    for name in ("train_step", "infer"):
        call = _first_call(mod, name)
        assert call.op == "conv2d_requant_rows" and call.args[0].same_as(mod[name].params[0])
        assert _first_call(whole, name).op == "conv2d_requant"
    buffers = {b["name"]: b for b in memory_plan(mod).buffers}
    assert buffers["input"]["streamed"] and buffers["input"]["offset"] is None
    c, _, w = model.input_info.shape
    band = row_kernel(mod[_first_call(mod, "train_step").gvar])
    assert [int(d) for d in band.params[0].shape] == [1, c, 3, w]
    var = _first_call(mod, "train_step").var.name
    assert buffers[f"{var}.window"]["size"] == c * 3 * w
    out_c, _, out_w = model.tensors["stem"].shape
    assert buffers[f"{var}.band"]["size"] == out_c * out_w
    image = int(np.prod(model.input_info.shape))
    assert max(row["input"] for row in memory_plan(mod).timeline) == 8  # the label and the lr only
    assert memory_plan(whole).timeline[0]["input"] == image + 8
    assert memory_plan(mod).arena_bytes <= memory_plan(whole).arena_bytes


def test_image_stays_when_the_first_conv_trains():
    """``full`` trains the first conv: its weight gradient reads the image, which must then stay whole."""
    mod = build_training_module(make_random_model(3, size=32), "full")
    assert _first_call(mod, "train_step").op == "conv2d_requant"
    assert not next(b for b in memory_plan(mod).buffers if b["name"] == "input")["streamed"]
    assert _first_call(mod, "infer").op == "conv2d_requant_rows"  # inference alone reads it once


def test_stream_input_rows_is_a_composable_pass():
    mod = build_training_module(make_random_model(3, size=32), "last-k:3")
    assert isinstance(StreamInputRows(), tvm.transform.Pass)
    again = tvm.transform.Sequential([StreamInputRows()])(mod)  # nothing left to rewrite: the same functions
    tvm.ir.assert_structural_equal(again["train_step"], mod["train_step"])
