"""StreamInputRows: the band kernel against numpy, the rewrite, the row schedule and the plan without the image.

The whole-step equality of the generated C (which streams the image, through a row reader on odd steps and a
reader that fails) with the Python trainer is in test_codegen.py; the board runs are in test_device.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import make_random_model, paper_model_path
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from relax_passes import RecomputeStreamedExpansion, StreamInputRows, memory_plan, pass_config
from relax_passes._fusion import reemit
from relax_passes._ir import decode
from relax_passes._row_pipeline import IMAGE, ROW_OPS, row_pipelines
from relax_passes.fuse_conv_requant import conv_requant_func
from relax_passes.plan_memory import plan as plan_function
from relax_passes.recompute_streamed_expansion import candidates
from relax_passes.stream_input_rows import row_kernel, rows_kernel
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.importers import load_model
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
    with pass_config(stream_layers=False):
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


def _ops(mod, name):
    return [decode(mod, b) for b in mod[name].body.blocks[0].bindings]


@pytest.mark.parametrize("scheme", ["last-k:1", "bias-only:1", "last-k:2"])
def test_frozen_layers_stream_and_their_outputs_leave_the_arena(scheme):
    """The frozen layers after the first conv run row by row: only the pipeline's last output is in the arena."""
    model = make_random_model(3, size=32)
    mod = build_training_module(model, scheme)
    with pass_config(stream_layers=False):
        first_only = build_training_module(model, scheme)
    (pipe,) = row_pipelines(mod, mod["train_step"])
    assert len(pipe.stages) > 1 and pipe.stages[0].inputs[0].source == IMAGE
    calls = _ops(mod, "train_step")
    streamed = {s.call.var.name for s in pipe.stages[:-1]}
    buffers = {}
    for b in memory_plan(mod).buffers:  # names repeat later in the step
        buffers.setdefault(b["name"], b)
    for name in streamed:
        assert buffers[name]["streamed"] and buffers[name]["offset"] is None
        assert buffers[f"{name}.ring"]["size"] > 0
    # The backward reads nothing the pipeline keeps inside; the layer after it is not streamed.
    inside = {s.call.var for s in pipe.stages[:-1]}
    assert not any(v in inside for c in calls[pipe.last + 1:] if c is not None for v in c.args)
    assert calls[pipe.last + 1] is None or calls[pipe.last + 1].op not in ROW_OPS
    assert memory_plan(mod).arena_bytes <= memory_plan(first_only).arena_bytes

    def forward_peak(plan):  # most bytes alive while the streamed layers (or, not streamed, the same layers) run
        nodes = {s.call.node for s in pipe.stages}
        return max(sum(v for k, v in row.items() if k not in ("index", "op", "node")) for row in plan.timeline
                   if any(n in nodes for n in row["node"].split("+")))

    assert forward_peak(memory_plan(mod)) < forward_peak(memory_plan(first_only))


def _replay(pipe):
    """An independent replay of the schedule with each ring's slots holding row numbers: every row a stage reads
    must be in its slot when read, and every stage makes its rows in order, each once."""
    slots = [[None] * s.ring_rows for s in pipe.stages]
    made = [0] * len(pipe.stages)
    for j, after in pipe.schedule():
        row = made[j]
        assert after[j] == row + 1
        for inp in pipe.stages[j].inputs:
            if inp.source == IMAGE:
                continue
            src = pipe.stages[inp.source]
            for r in range(inp.first_row(row), inp.first_row(row) + inp.rows):
                if 0 <= r < src.shape[1]:
                    assert slots[inp.source][r % src.ring_rows] == r, (pipe.stages[j].call.node, row, r)
        if j < len(pipe.stages) - 1:
            slots[j][row % pipe.stages[j].ring_rows] = row
        made[j] += 1
    assert made[-1] == pipe.stages[-1].shape[1]


@pytest.mark.parametrize("size", [16, 32, 40])
@pytest.mark.parametrize("recompute", ["never", "always"])
def test_ring_rows_hold_every_row_read(size, recompute):
    """Also where the expansions are recomputed: their readers' windows read the narrow rows, which must be there."""
    with pass_config(recompute_streamed_expansion=recompute):
        mod = build_training_module(make_random_model(5, size=size), "bias-only:1")
    for name in ("train_step", "infer"):
        for pipe in row_pipelines(mod, mod[name]):
            _replay(pipe)
            assert any(s.recomputed for s in pipe.stages) == (recompute == "always" and size > 16)


@pytest.mark.parametrize("recompute", ["at-peak", "always"])
def test_paper_model_pipelines_replay(recompute):
    """MCUNet's pipeline in infer (strides 2, 3x3 kernels, a residual add); at its default its expansions keep their
    rings, in train_step and in infer (whose pipeline peaks below train_step's backward, and the two share the C
    arena), "always" recomputes both."""
    with pass_config(recompute_streamed_expansion=recompute):
        mod = build_training_module(load_model(paper_model_path("mcunet-5fps")), "paper-99kb")
    pipes = row_pipelines(mod, mod["infer"])
    assert pipes and len(pipes[0].stages) > 5
    for pipe in pipes:
        _replay(pipe)
        assert all(0 < s.ring_rows <= 2 * max(i.rows for c, i in pipe.consumers[j]) + 1
                   for j, s in enumerate(pipe.stages[:-1]) if not s.recomputed)
        assert any(s.recomputed for s in pipe.stages) == (recompute == "always")
    train = row_pipelines(mod, mod["train_step"])[0]
    assert [s.call.node for s in train.stages if s.recomputed] == ([] if recompute == "at-peak" else ["blocks[1].pointwise1", "blocks[2].pointwise1"])


def test_recompute_streamed_expansion_at_the_peak_only():
    """Proxyless paper-98kb peaked in its streamed layers (40 KB of arena, the rings of block 1's and block 3's
    expansions 7.5 and 10.5 KB).  At its default the pass recomputes those two, the widest first, and stops once the
    step peaks elsewhere (block 2's expansion keeps its ring); the same bits in C are in test_codegen.py."""
    mod = build_training_module(load_model(paper_model_path("proxyless-w0.3")), "paper-98kb", kernels="optimized")
    (pipe,) = row_pipelines(mod, mod["train_step"])
    recomputed = [s for s in pipe.stages if s.recomputed]
    assert [s.call.node for s in recomputed] == ["blocks[1].pointwise1", "blocks[3].pointwise1"]
    assert [pipe.stages[e].call.node for e, _ in candidates(pipe)] == ["blocks[2].pointwise1"]
    plan = memory_plan(mod)
    assert not pipe.first <= plan.peak_index <= pipe.last and plan.arena_bytes < 30 * 1024
    # infer, which shares the C arena, recomputes them too, so its streamed layers stay below train_step's peak
    (infer,) = row_pipelines(mod, mod["infer"])
    assert [s.call.node for s in infer.stages if s.recomputed] == [s.call.node for s in recomputed]
    assert plan_function(mod, "infer").peak_live_bytes < plan.peak_live_bytes
    # the optimized variant picks groups whose expansion runs on the DSP GEMM (an even count), windows within 1 KB
    assert all(s.group % 2 == 0 and pipe.expanded_bytes <= 1024 for s in recomputed)


def test_recompute_streamed_expansion_options_and_composition():
    model = make_random_model(5, size=32)
    base = build_training_module(model, "bias-only:1")
    marked = RecomputeStreamedExpansion("always")(base)
    assert tvm.transform.Sequential([RecomputeStreamedExpansion("never")])(base).same_as(base)
    (pipe,) = row_pipelines(marked, marked["train_step"])
    assert [s for s in pipe.stages if s.recomputed] and not candidates(pipe)
    with pytest.raises(TinyTrainError, match="recompute_streamed_expansion is 'sometimes'"):
        RecomputeStreamedExpansion("sometimes")(base)
    with pass_config(recompute_min_saving=1 << 30):  # no recomputation saves a GB: at-peak leaves the module alone
        assert RecomputeStreamedExpansion()(base).same_as(base)


def test_a_streamed_layer_on_an_unstreamed_tensor_is_an_error_naming_it():
    model = make_random_model(3, size=32)
    with pass_config(stream_input=False):
        mod = build_training_module(model, "last-k:1")
    second = next(c for c in _ops(mod, "train_step") if c is not None and c.op == "add_int8")
    prim, op = rows_kernel(mod, second)

    def emit(bb, binding):
        if not binding.var.same_as(second.var):
            return False
        gv = bb.add_func(prim, op)
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(relax.call_tir(gv, binding.value.args[1], binding.var.ty))))
        return True

    broken = reemit(mod, "train_step", emit)
    with pytest.raises(TinyTrainError, match=rf"binding 3 \({second.var.name} = add_int8_rows of {second.node}\) reads"):
        row_pipelines(broken, broken["train_step"])


def test_window_holds_every_input_channel_a_band_kernel_reads():
    """A regular 3x3 conv on 32 channels making 16 gathers all 32 input channels per window; a depthwise conv's window
    holds one channel group only (here 4 of 48)."""
    from relax_passes._ir import KernelCall
    from relax_passes._row_pipeline import RowInput, RowStage

    def stage(c_in, c_out, groups, group):
        x = relax.Var("x", relax.TensorType((1, c_in, 8, 16), "int8"))
        w = relax.Var("w", relax.TensorType((c_out, c_in // groups, 3, 3), "int8"))
        y = relax.Var("y", relax.TensorType((1, c_out, 8, 16), "int8"))
        call = KernelCall(y, "conv2d_requant_rows", {"groups": groups}, [x, w], None)
        return RowStage(0, call, [RowInput(0, 3, 1, 1, 0)], (c_out, 8, 16), group)

    assert stage(32, 16, 1, 16).window_bytes() == 32 * 3 * 16
    assert stage(48, 48, 48, 4).window_bytes() == 4 * 3 * 16
