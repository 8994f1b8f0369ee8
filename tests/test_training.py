"""The int8 training step: TVM train_step == numpy reference bit for bit; IR properties of the passes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tvm
from conftest import make_random_model

from relax_passes import (
    AccumulateGradients,
    AppendLoss,
    DepthwiseInPlace,
    FuseConvRequant,
    FuseWeightUpdate,
    PlanMemory,
    QuantizedGradient,
    ReorderUpdates,
    SparseUpdate,
    memory_plan,
    pass_config,
)
from relax_passes._buffers import IN_PLACE_OPS, SGD_OPS, analyze
from relax_passes._ir import decode
from relax_passes.plan_memory import validate_plan
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.ops.schedule import kernel_variant
from tvm_tinytrain.relax_build import build_relax
from tvm_tinytrain.scheme import layer_updates, parse_scheme
from tvm_tinytrain.train_reference import train_step
from tvm_tinytrain.trainer import Int8Trainer, build_training_module

BACKWARD_OPS = {"apply_mask", "conv2d_input_grad", "conv2d_weight_grad", "bias_grad", "add_f32", "global_avg_pool_grad", *IN_PLACE_OPS}


def partial_scheme(tmp_path) -> str:
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"n_bias_update": 4, "weight_idx": [2, 3, 5], "weight_ratio": [0.5, 0.25, 0.5]}))
    return str(path)


@pytest.fixture(scope="module")
def model():
    return make_random_model(3)


# Without QAS the int8 gradients are ~1e-5 of the QAS ones (the paper's point), so a step needs a huge lr to move them.
@pytest.mark.parametrize("spec, qas, lr, kernels", [
    ("full", True, 0.5, "reference"), ("bias-only:2", True, 0.5, "reference"), ("last-k:2", False, 3e4, "reference"),
    ("bias-only:6", True, 0.5, "reference"),
    ("partial", True, 0.5, "reference"), ("full", True, 0.5, "optimized"), ("partial", True, 0.5, "optimized"),
    ("bias-only:6", True, 0.5, "optimized"),
])
def test_train_step_matches_numpy_reference_bit_for_bit(model, tmp_path, spec, qas, lr, kernels):
    spec = partial_scheme(tmp_path) if spec == "partial" else spec
    trainer = Int8Trainer(model, spec, num_classes=4, lr=lr, qas=qas, kernels=kernels)
    init = dict(trainer.params)
    ups = layer_updates(parse_scheme(spec, model), model)
    rng = np.random.default_rng(7)
    for step in range(2):  # the second step starts from the first one's weights
        x = rng.integers(-128, 128, (1, *model.input_info.shape)).astype(np.int8)
        label = int(rng.integers(0, 4))
        current = trainer.weights()
        loss = trainer.step(x, label)
        ref = train_step(_with_weights(model, current), current["classifier_weight"], current["classifier_bias"], x,
                         np.array([label], np.int32), lr, ups, qas=qas)
        assert sorted(ref.params) == sorted(n.removesuffix("_trained") for n in trainer.updated)
        weights = trainer.weights()
        for name in ref.params:
            np.testing.assert_array_equal(weights[name], ref.params[name], err_msg=f"{spec} step {step}: {name}")
        assert abs(loss - ref.loss) <= 1e-5 * max(1.0, abs(ref.loss))
    changed = [n for n in trainer.updated if not np.array_equal(trainer.params[n], init[n])]
    assert len(changed) >= len(trainer.updated) - 1, "a step that moves almost nothing cannot show bit-exactness"
    frozen = set(init) - set(trainer.updated)
    assert all(np.array_equal(trainer.params[n], init[n]) for n in frozen)


def test_odd_sized_optimized_step_matches_numpy_reference(tmp_path):
    """11-wide rows, which no register tile divides: the optimized expansion + depthwise kernel tiles only along
    its plane row, so there it does not tile (it used to fail to schedule)."""
    test_train_step_matches_numpy_reference_bit_for_bit(make_random_model(4, size=22), tmp_path, "bias-only:2", True, 0.5, "optimized")


def _with_weights(model, params):
    """A copy of ``model`` carrying the trainer's current int8 weights and biases."""
    from copy import deepcopy

    from tvm_tinytrain.relax_build import param_name

    m = deepcopy(model)
    for node in m.convs():
        node.weight = params[param_name(node.name, "weight")]
        node.bias = params[param_name(node.name, "bias")]
    return m


def _step_calls(mod):
    return [c for c in (decode(mod, b) for b in mod["train_step"].body.blocks[0].bindings) if c is not None]


def _reordered(model, spec, reorder=True):
    """The step right after ReorderUpdates: weight gradients are still tensors of their own."""
    mod, _ = build_relax(model)
    return tvm.transform.Sequential([AppendLoss(4), QuantizedGradient(), SparseUpdate(spec), ReorderUpdates(reorder)])(mod)


def test_frozen_layers_have_no_backward_ops(model):
    mod = build_training_module(model, "bias-only:2", num_classes=4)
    calls = _step_calls(mod)
    trained_nodes = {"b1.dw", "b1.project", "classifier", "loss", "pool"}
    backward = [c for c in calls if c.op in BACKWARD_OPS]
    assert backward, "the step must have a backward"
    assert {c.node for c in backward} <= trained_nodes
    assert not [c for c in calls if c.op in ("conv2d_weight_grad", "conv2d_weight_grad_sgd")]
    assert not [c for c in calls if c.op == "conv2d_input_grad" and c.node == "b1.dw"], "the input-gradient chain must stop at b1.dw"
    masked = {c.node for c in calls if c.op == "clamp_mask"}
    assert masked == {"b1.dw", "b1.project"}, "only layers the gradient crosses keep a mask"


def test_partial_weights_save_only_their_channel_slice(model, tmp_path):
    mod = build_training_module(model, partial_scheme(tmp_path), num_classes=4)
    gathers = [c for c in _step_calls(mod) if c.op == "gather_channels"]
    assert {c.node for c in gathers} == {"b0.dw", "b0.project", "b1.project"}
    wgrads = {c.node: c for c in _step_calls(mod) if c.op in ("conv2d_weight_grad", "conv2d_weight_grad_sgd")}
    assert [int(d) for d in wgrads["b0.project"].var.ty.shape] == [8, 4, 1, 1]  # 0.25 of 16 input channels
    step = mod["train_step"]
    slices = {p.name: [int(d) for d in p.ty.shape] for p in step.params if p.name.endswith("_trained")}
    assert slices == {"b0_dw_weight_trained": [8, 1, 5, 5], "b0_project_weight_trained": [8, 4, 1, 1], "b1_project_weight_trained": [12, 4, 1, 1]}
    updated = {str(n) for n in step.attrs["tinytrain.updated_params"]}
    assert set(slices) <= updated and not {"b0_dw_weight", "b0_project_weight", "b1_project_weight"} & updated


def test_reorder_frees_each_gradient_at_its_update(model):
    """After ReorderUpdates nothing runs between a weight gradient and its in-place update but the
    kernels that must read the old weight first (the input gradient), other updates and aliases."""
    allowed_between = {"", "conv2d_input_grad", *SGD_OPS}  # "": a tuple-field alias, no kernel
    spans = {}
    for reorder in (True, False):
        mod = _reordered(model, "full", reorder)
        sb = analyze(mod, mod["train_step"])
        grads = [b for b in sb.buffers if b.kind == "weight_gradient"]
        assert len(grads) == 14 and all(sb.ops[b.end] in SGD_OPS for b in grads)
        spans[reorder] = {b.name: {sb.ops[i] for i in range(b.start + 1, b.end)} for b in grads}
    assert all(between <= allowed_between for between in spans[True].values()), spans[True]
    assert any(not between <= allowed_between for between in spans[False].values())
    with_r = memory_plan(build_training_module(model, "full", num_classes=4, reorder=True)).peak_sram_bytes
    without = memory_plan(build_training_module(model, "full", num_classes=4, reorder=False)).peak_sram_bytes
    assert with_r < without


def test_memory_plan_is_valid_and_validator_catches_overlap(model):
    plan = memory_plan(build_training_module(model, "last-k:3", num_classes=4))
    assert plan.peak_live_bytes <= plan.arena_bytes
    assert plan.peak_sram_bytes == plan.arena_bytes + plan.trainable_param_bytes
    assert max(sum(v for k, v in row.items() if k not in ("index", "op", "node")) for row in plan.timeline) == plan.peak_live_bytes
    from relax_passes._buffers import Buffer, storage_buffers

    bufs = [Buffer(**b) for b in plan.buffers]
    validate_plan(bufs)
    stored = storage_buffers(bufs)
    a, b = next((a, b) for a in stored for b in stored if a is not b and a.overlaps_in_time(b) and a.size and b.size)
    b.offset = a.offset
    with pytest.raises(TinyTrainError, match="overlap while both are alive"):
        validate_plan(bufs)


def test_passes_compose_with_tvm_sequential_and_pass_config(model):
    mod, _ = build_relax(model)
    with tvm.transform.PassContext(opt_level=3), pass_config(num_classes=3, scheme="bias-only:1", reorder=False, qas=False):
        out = tvm.transform.Sequential([AppendLoss(), QuantizedGradient(), SparseUpdate(), ReorderUpdates(), PlanMemory(),
                                        tvm.relax.transform.CanonicalizeBindings()])(mod)
    step = out["train_step"]
    assert [str(n) for n in step.attrs["tinytrain.updated_params"]] == ["classifier_weight", "classifier_bias", "b1_project_bias"]
    assert bool(step.attrs["tinytrain.qas"]) is False
    assert [int(d) for d in out["infer"].ret_ty.shape] == [1, 3]


@pytest.mark.parametrize("spec, message", [
    ("bogus", "unknown scheme 'bogus'"),
    ("bias-only:99", "'n_bias_update' = 99"),
])
def test_bad_scheme_is_a_clear_error(model, spec, message):
    with pytest.raises(TinyTrainError, match=message):
        build_training_module(model, spec, num_classes=4)


def test_bad_training_input(model):
    trainer = Int8Trainer(model, "bias-only:1", num_classes=4)
    with pytest.raises(TinyTrainError, match="label 4 out of range"):
        trainer.step(np.zeros((1, 3, 16, 16), np.int8), 4)
    with pytest.raises(TinyTrainError, match="expects int8"):
        trainer.step(np.zeros((3, 15, 16), np.int8), 0)
    with pytest.raises(TinyTrainError, match="unknown tinytrain pass option"):
        with pass_config(schem="full"):
            pass


@pytest.mark.parametrize("seed", [0, 3])
def test_int8_gradients_agree_with_float_autodiff(seed):
    """The int8 backward (QAS gradients mapped back to real weights) against TVM's own Gradient on the
    dequantized float network, itself checked against finite differences in test_float_mode.py.

    They differ only through activation quantization, so every tensor's gradient must point the same
    way (cosine > 0.9) with a similar norm.  (Random models whose activations sit mostly on the clamp
    bounds, e.g. seed 1, disagree more: there int8 and float clamp different elements.)
    """
    from tvm_tinytrain.float_mode import FloatTrainer
    from tvm_tinytrain.relax_build import param_name

    m = make_random_model(seed)
    ft = FloatTrainer(m, 4, lr=0.001, seed=0)
    x = np.random.default_rng(seed).integers(-128, 128, (1, 3, 16, 16)).astype(np.int8)
    loss, g_float = ft.gradients(x, np.array([1]))
    head_w, head_b = (ft.state_dict()[k] for k in ("head_weight", "head_bias"))
    ref = train_step(m, head_w, head_b, x, np.array([1], np.int32), 0.0, layer_updates(parse_scheme("full", m), m))
    assert abs(loss - ref.loss) < 0.05 * loss
    for node in m.convs():
        ws = node.weight_scales.astype(np.float64)
        x_scale = m.tensors[node.input].quant.scale
        for field, real in (("weight", ref.grads[param_name(node.name, "weight")] * ws[:, None, None, None]),
                            ("bias", ref.grads[param_name(node.name, "bias")] * ws * x_scale)):
            a, b = real.ravel(), g_float[param_name(node.name, field)].ravel().astype(np.float64)
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert cos > 0.9 and 0.8 < np.linalg.norm(a) / np.linalg.norm(b) < 1.25, (node.name, field, cos)


def test_paper_model_learns_digits_with_paper_scheme():
    """MCUNet-5FPS with paper-99kb on scikit-learn digits (128x128, new 10-class head): 800 int8 steps
    (0.6 epoch) take test accuracy from chance to well above it (scripts/train_digits.py runs the full
    epoch).  Training is deterministic, so this is not a flaky threshold."""
    from conftest import paper_model_path

    from tvm_tinytrain.data import digits
    from tvm_tinytrain.importers.paper_pkl import load_paper_model

    model = load_paper_model(paper_model_path("mcunet-5fps"))
    trainer = Int8Trainer(model, "paper-99kb", num_classes=10, lr=0.002)
    x, y, tx, ty = digits((128, 128))
    before = trainer.evaluate(tx[:100], ty[:100])
    for i in range(800):
        trainer.step(x[i], int(y[i]))
    after = trainer.evaluate(tx[:100], ty[:100])
    assert before < 0.25 and after > 0.6, (before, after)


def test_gradient_accumulation_matches_reference(model, tmp_path):
    """accumulate=3: three accumulate_step calls sum float32 gradients at fixed weights, then one update
    with lr/3 (the mean); equal bit for bit to the numpy reference doing the same."""
    from tvm_tinytrain.ops import reference_backward as bwd
    from tvm_tinytrain.relax_build import param_name

    spec = partial_scheme(tmp_path)
    trainer = Int8Trainer(model, spec, num_classes=4, lr=0.5, accumulate=3)
    init = trainer.weights()
    ups = layer_updates(parse_scheme(spec, model), model)
    rng = np.random.default_rng(11)
    acc = {}
    for i in range(3):
        x = rng.integers(-128, 128, (1, 3, 16, 16)).astype(np.int8)
        trainer.step(x, i)
        ref = train_step(model, init["classifier_weight"], init["classifier_bias"], x, np.array([i], np.int32), 0.5, ups)
        acc = {k: bwd.add_f32(acc[k], g) if k in acc else np.float32(0) + g for k, g in ref.grads.items()}
        if i < 2:
            assert all(np.array_equal(v, init[k]) for k, v in trainer.weights().items()), "no update before the batch is complete"
    lr = np.array([0.5 / 3], np.float32)
    by_name = {u.node: u for u in ups}
    weights = trainer.weights()
    for name, g in acc.items():
        if name.startswith("classifier"):
            want = bwd.sgd_update_f32(init[name], g, lr)
        elif name.endswith("bias"):
            want = bwd.sgd_update_int32(init[name], g, lr)
        else:
            conv = next(c for c in model.convs() if param_name(c.name, "weight") == name)
            chans = by_name[conv.name].channels
            full = conv.out_channels if conv.depthwise else conv.in_channels
            partial = len(chans) < full
            want = bwd.sgd_update_int8(init[name], g, lr, (0 if conv.depthwise else 1) if partial else None, chans if partial else None)
        np.testing.assert_array_equal(weights[name], want, err_msg=name)
    assert sum(not np.array_equal(weights[k], init[k]) for k in acc) >= len(acc) - 1
    assert trainer.memory_plan().trainable_param_bytes > Int8Trainer(model, spec, num_classes=4).memory_plan().trainable_param_bytes


def test_frozen_expansion_is_fused_into_its_depthwise_conv(model):
    """bias-only:2 leaves block b0 frozen: its 1x1 expansion runs inside the depthwise conv, one channel plane at a
    time, so the expanded tensor is never a buffer (the step stays bit-exact: see the reference test above).  Its
    8x8 planes are below the option ``min_fused_plane``, which keeps such planes two kernels by default."""
    assert not [c for c in _step_calls(build_training_module(model, "bias-only:2", num_classes=4)) if c.op == "expand_depthwise"]
    with pass_config(min_fused_plane=64):
        mod = build_training_module(model, "bias-only:2", num_classes=4)
    calls = _step_calls(mod)
    assert [c.node for c in calls if c.op == "expand_depthwise"] == ["b0.expand+b0.dw"]
    assert not [c for c in calls if c.node in ("b0.expand", "b0.dw")]
    with pass_config(kernel_local_bytes=0):  # every internal buffer in the workspace, so its size says what the kernel keeps
        sb = analyze(mod, mod["train_step"])
    fused = next(b for b in sb.buffers if b.kind == "workspace" and sb.ops[b.start] == "expand_depthwise")
    assert fused.size < 16 * 8 * 8  # one 8x8 plane (+ a scalar), not the 16-channel expanded tensor


def test_weight_gradients_are_fused_into_their_in_place_updates(model):
    """After FuseWeightUpdate an int8 weight gradient is no tensor where that saves memory: one kernel sums each
    element and updates the weight in place (bit-exactness: the reference tests above run this pipeline).  Where
    the input gradient runs in between and the saved input is larger than the gradient, the pair stays apart."""
    from relax_passes._buffers import type_bytes

    mod = build_training_module(model, "full", num_classes=4)
    calls = _step_calls(mod)
    fused = [c for c in calls if c.op == "conv2d_weight_grad_sgd"]
    updated = {str(n) for n in mod["train_step"].attrs["tinytrain.updated_params"]}
    assert fused and all(c.args[0].name in updated and c.attrs["param"] == c.args[0].name for c in fused)
    for grad in (c for c in calls if c.op == "conv2d_weight_grad"):
        assert type_bytes(grad.args[0].ty) > type_bytes(grad.var.ty), f"{grad.node}: fusing would have saved memory"
    with pass_config(kernel_local_bytes=0):  # every internal buffer in the workspace, so its size says what the kernel keeps
        sb = analyze(mod, mod["train_step"])
    kept = [b.size for b in sb.buffers if b.kind == "workspace" and sb.ops[b.start] == "conv2d_weight_grad_sgd"]
    assert kept and all(size <= 4 for size in kept)  # one float
    unfused = tvm.transform.Sequential([PlanMemory()])(_reordered(model, "full"))
    assert memory_plan(mod).peak_parts["weight_gradient"] < memory_plan(unfused).peak_parts["weight_gradient"]


def test_accumulation_must_come_before_the_fused_updates(model):
    fused = FuseWeightUpdate()(_reordered(model, "last-k:2"))
    with pytest.raises(TinyTrainError, match="run it before FuseWeightUpdate"):
        AccumulateGradients()(fused)


def test_elementwise_gradients_overwrite_a_dying_operand(model):
    """apply_mask / add_f32 outputs share the storage of an operand that dies there; the validator checks the alias."""
    plan = memory_plan(build_training_module(model, "full", num_classes=4))
    from relax_passes._buffers import Buffer

    bufs = [Buffer(**b) for b in plan.buffers]
    aliases = [b for b in bufs if b.alias is not None]
    assert aliases and all(b.offset == bufs[b.alias].offset and bufs[b.alias].end >= b.end for b in aliases)
    validate_plan(bufs)
    aliases[0].offset += 16
    with pytest.raises(TinyTrainError, match="aliases"):
        validate_plan(bufs)


def test_depthwise_kernels_overwrite_their_dying_operand(model):
    """bias-only:6 backpropagates to the stem without saving depthwise inputs: the forward depthwise convs and the
    stride-1 depthwise input gradient write over their operand (C bit-exactness: test_codegen's bias-only:6 case)."""
    mod = tvm.transform.Sequential([FuseConvRequant(), DepthwiseInPlace(), PlanMemory()])(_reordered(model, "bias-only:6"))
    in_place = [c for c in _step_calls(mod) if "in_place" in c.op]
    assert sorted((c.op, c.node) for c in in_place) == [  # b1.dw has stride 2: its input gradient is larger than its operand
        ("depthwise_in_place", "b0.dw"), ("depthwise_in_place", "b1.dw"), ("depthwise_input_grad_in_place", "b0.dw")]
    plan = memory_plan(mod)
    sb = analyze(mod, mod["train_step"])  # the plan's buffers, in the same order
    outputs = [k for k, b in enumerate(sb.buffers) if "in_place" in sb.ops[b.start] and b.kind != "workspace"]
    assert len(outputs) == 3
    for k in outputs:  # an output as large as its operand shares its storage; a smaller one (b1.dw) only its offset
        out = plan.buffers[k]
        storage = out["alias"] if out["alias"] is not None else out["overwrites"]
        assert storage is not None and plan.buffers[storage]["offset"] == out["offset"]
        assert (out["overwrites"] is not None) == (out["size"] < plan.buffers[storage]["size"])
    assert any(plan.buffers[k]["overwrites"] is not None for k in outputs)
    with pass_config(max_plane_bytes=8):
        small = tvm.transform.Sequential([FuseConvRequant(), DepthwiseInPlace(), PlanMemory()])(_reordered(model, "bias-only:6"))
    assert not [c for c in _step_calls(small) if "in_place" in c.op]
    assert memory_plan(small).arena_bytes > plan.arena_bytes


FUSED_BLOCKS = {  # scheme -> (fused op, its nodes): bias-only:13 trains biases only, so every block's projection input
    # gradient joins too (stride 1 included); last-k:6 trains block 4's weights, whose depthwise weight keeps it out
    # (block 1, a residual block at the step's peak, is ResidualBackwardInPlace's banded kernel, the same fusion)
    "bias-only:13": ("depthwise_block_backward", [f"block{i}.project+block{i}.dw+block{i}.expand" for i in (4, 3, 2, 1)]),
    "last-k:6": ("depthwise_block_backward_sgd", ["block4.dw+block4.expand"]),
    # block 4's expansion trained on half its input channels (SparseUpdate's merge), its projection and depthwise bias
    # trained: the merged slice is updated in the fused kernel, behind the projection's front (the step's peak is in
    # block 3's backward, which its half-trained projection keeps unfused)
    "default-sparse-c": ("depthwise_block_backward_sgd", ["block4.project+block4.dw+block4.expand"]),
}
SCHEME_FILES = Path(__file__).resolve().parents[1] / "scripts" / "schemes"


@pytest.mark.parametrize("kernels", ["reference", "optimized"])
@pytest.mark.parametrize("scheme", list(FUSED_BLOCKS))
def test_depthwise_backward_is_fused_with_the_expansion(scheme, kernels):
    """Behind each strided depthwise conv of the default model, the expansion's mask, bias gradient, input gradient
    (and, where its weight is trained, its weight update, in place) consume the depthwise input gradient a few planes at
    a time; where the depthwise weight is frozen, the planes come straight from the projection's output gradient (any
    stride).  The step stays equal to the numpy reference bit for bit and needs less memory."""
    from tvm_tinytrain.default_model import load_default_model

    model = load_default_model()
    op, nodes = FUSED_BLOCKS[scheme]
    scheme = str(SCHEME_FILES / f"{scheme}.json") if scheme.startswith("default-sparse") else scheme
    trainer = Int8Trainer(model, scheme, num_classes=5, lr=0.05, kernels=kernels)
    calls = _step_calls(trainer.mod)
    assert [c.node for c in calls if c.op in (op, "residual_block_backward")] == nodes
    assert [c.node for c in calls if c.op == "residual_block_backward"] == (nodes[-1:] if scheme == "bias-only:13" else [])
    for n in nodes:  # the kernels each fused one replaces are gone
        *front, dw, expansion = n.split("+")
        gone = {expansion: ("apply_mask", "bias_grad", "conv2d_input_grad", "conv2d_weight_grad_sgd"),
                dw: ("conv2d_input_grad", *(("apply_mask", "bias_grad") if front else ())), **{p: ("conv2d_input_grad",) for p in front}}
        assert not [c for c in calls if c.op in gone.get(c.node, ())]
    _assert_steps_match_reference(trainer, model, scheme)
    mod, _ = build_relax(model)
    with kernel_variant(kernels):  # the same kernels' workspaces on both sides
        unfused = tvm.transform.Sequential([AppendLoss(5), QuantizedGradient(), SparseUpdate(scheme), ReorderUpdates(), FuseConvRequant(),
                                            DepthwiseInPlace(), PlanMemory()])(mod)
    fused_peak, unfused_peak = memory_plan(trainer.mod).peak_live_bytes, memory_plan(unfused).peak_live_bytes
    assert fused_peak < unfused_peak or (scheme.endswith("default-sparse-c.json") and fused_peak == unfused_peak)
    if op == "depthwise_block_backward_sgd":  # an option, on by default: without it the expansion keeps its own kernels
        with pass_config(fuse_trained_expansion=False):
            assert not [c for c in _step_calls(build_training_module(model, scheme, num_classes=5)) if c.op == op]


def _assert_steps_match_reference(trainer, model, scheme, steps: int = 2) -> None:
    """``steps`` training steps of ``trainer`` on random images equal the numpy reference's, weight for weight."""
    ups = layer_updates(parse_scheme(scheme, model), model)
    rng = np.random.default_rng(3)
    init = trainer.weights()
    for step in range(steps):
        x, label = rng.integers(-128, 128, (1, 3, 32, 32)).astype(np.int8), int(rng.integers(0, 5))
        current = trainer.weights()
        trainer.step(x, label)
        ref = train_step(_with_weights(model, current), current["classifier_weight"], current["classifier_bias"], x,
                         np.array([label], np.int32), 0.05, ups)
        for name in ref.params:
            np.testing.assert_array_equal(trainer.weights()[name], ref.params[name], err_msg=f"step {step}: {name}")
    moved = [n for n in ref.params if not n.startswith("classifier") and not np.array_equal(trainer.weights()[n], init[n])]
    assert moved, "steps that move no int8 weight or int32 bias cannot show that the fused kernels are bit-exact"


STOPPING_BLOCKS = {  # scheme -> (op, node, fused kernel's outputs): where the backward stops inside block 4
    "bias-only:2": ("projection_bias_grad", "block4.project", 1),  # at the depthwise bias: the projection's front alone
    "bias-only:3": ("depthwise_block_backward", "block4.project+block4.dw+block4.expand", 2),  # at the expansion's bias
}


@pytest.mark.parametrize("kernels", ["reference", "optimized"])
@pytest.mark.parametrize("scheme", list(STOPPING_BLOCKS))
def test_backward_stopping_in_a_block_has_no_input_gradient_tensor(scheme, kernels):
    """Where the backward stops at a bias inside an inverted block, the fused kernels give that bias gradient (and
    the depthwise one) without the tensors of the expanded width: no input gradient kernel is left in the step, the
    step equals the numpy reference, and its peak is lower than with the separate kernels."""
    from tvm_tinytrain.default_model import load_default_model

    model = load_default_model()
    op, node, outputs = STOPPING_BLOCKS[scheme]
    trainer = Int8Trainer(model, scheme, num_classes=5, lr=0.05, kernels=kernels)
    calls = _step_calls(trainer.mod)
    fused = [c for c in calls if c.op == op]
    assert [c.node for c in fused] == [node]
    assert len(fused[0].var.ty.fields if isinstance(fused[0].var.ty, tvm.relax.TupleType) else [fused[0].var.ty]) == outputs
    assert not [c for c in calls if c.op == "conv2d_input_grad" or (c.op == "apply_mask" and c.node in ("block4.dw", "block4.expand"))]
    _assert_steps_match_reference(trainer, model, scheme)
    mod, _ = build_relax(model)
    with kernel_variant(kernels):
        unfused = tvm.transform.Sequential([AppendLoss(5), QuantizedGradient(), SparseUpdate(scheme), ReorderUpdates(), FuseConvRequant(),
                                            DepthwiseInPlace(), PlanMemory()])(mod)
    assert memory_plan(trainer.mod).peak_live_bytes < memory_plan(unfused).peak_live_bytes


@pytest.mark.parametrize("kernels", ["reference", "optimized"])
@pytest.mark.parametrize("scheme, blocks", [("bias-only:7", ["block3"]), ("bias-only:13", ["block3", "block1"])])
def test_residual_gradient_is_read_through_its_mask(scheme, blocks, kernels):
    """Blocks 3 and 1 are residual: a block's output gradient reaches the skip path unmasked and the projection through
    the projection's clamp mask (block 1's only where the backward goes on to the stem).  The fused kernel's front and
    the projection's bias gradient read it through that mask (``masked_bias_grad``), so the masked copy, a third
    gradient tensor at the block's backward, is never stored: the step equals the numpy reference and needs less
    memory than with ``masked_reads=False``, which stores the copy."""
    from tvm_tinytrain.default_model import load_default_model

    model = load_default_model()
    trainer = Int8Trainer(model, scheme, num_classes=5, lr=0.05, kernels=kernels)
    calls = _step_calls(trainer.mod)
    projections = [f"{b}.project" for b in blocks]
    assert [c.node for c in calls if c.op == "masked_bias_grad"] == projections
    assert not [c for c in calls if c.op == "apply_mask" and c.node in projections]
    _assert_steps_match_reference(trainer, model, scheme)
    with pass_config(masked_reads=False):
        copied = build_training_module(model, scheme, num_classes=5, kernels=kernels)
    assert [c.node for c in _step_calls(copied) if c.op == "apply_mask" and c.node in projections] == projections
    assert memory_plan(trainer.mod).peak_live_bytes < memory_plan(copied).peak_live_bytes


@pytest.mark.parametrize("kernels", ["reference", "optimized"])
@pytest.mark.parametrize("scheme", ["bias-only:13", "last-k:6"])
def test_fused_block_backward_updates_its_biases_in_place(scheme, kernels):
    """The fused block backward applies the SGD steps of the expansion's and the depthwise conv's biases itself, each
    channel's as soon as its gradient is summed: no bias gradient tensor or separate update of those biases is left
    in the step, the step equals the numpy reference, and its bias-gradient buffers are smaller than with
    ``fuse_bias_updates=False`` (its peak no larger)."""
    from tvm_tinytrain.default_model import load_default_model

    model = load_default_model()
    trainer = Int8Trainer(model, scheme, num_classes=5, lr=0.05, kernels=kernels)
    calls = _step_calls(trainer.mod)
    fused = [c for c in calls if c.op.startswith("depthwise_block_backward")]
    # the expansion's bias, and the depthwise conv's where the projection's front is fused too (a frozen depthwise weight)
    biases = {n for c in fused for n in c.node.split("+")[-2 if c.node.count("+") == 2 else -1:]}
    assert biases and not [c for c in calls if c.op in ("bias_grad", "sgd_update_int32") and c.node in biases]
    assert all(c.attrs["in_place"] for c in fused)
    _assert_steps_match_reference(trainer, model, scheme)
    with pass_config(fuse_bias_updates=False):
        separate = build_training_module(model, scheme, num_classes=5, kernels=kernels)
    assert [c for c in _step_calls(separate) if c.op == "sgd_update_int32" and c.node in biases]
    plans = memory_plan(trainer.mod), memory_plan(separate)
    fused_grads, separate_grads = (sum(b["size"] for b in p.buffers if b["kind"] == "weight_gradient") for p in plans)
    assert fused_grads < separate_grads and plans[0].peak_live_bytes <= plans[1].peak_live_bytes


@pytest.mark.parametrize("kernels", ["reference", "optimized"])
def test_trained_expansion_recomputes_its_block_masks(kernels, tmp_path):
    """Block 4's expansion trained whole behind a frozen depthwise conv, and the biases from block 3's expansion on: the
    block's fused backward
    recomputes the two clamp masks from the saved block input instead of reading them, so the forward keeps no mask of
    block 4's expansion or depthwise conv and fuses them (FuseExpandDepthwise, its 8x8 planes allowed); the step equals
    the numpy reference, and needs less memory than with ``recompute_masks=False``, which keeps the masks."""
    from tvm_tinytrain.default_model import load_default_model

    model = load_default_model()
    scheme = tmp_path / "expansion.json"
    scheme.write_text(json.dumps({"n_bias_update": 6, "weight_idx": [10], "weight_ratio": [1.0]}))
    scheme = str(scheme)
    with pass_config(min_fused_plane=64):
        trainer = Int8Trainer(model, scheme, num_classes=5, lr=0.05, kernels=kernels)
    calls = _step_calls(trainer.mod)
    assert [c.node for c in calls if c.op == "depthwise_block_backward_sgd"] == ["block4.project+block4.dw+block4.expand"]
    assert not [c for c in calls if c.op == "clamp_mask" and c.node in ("block4.expand", "block4.dw")]
    assert "block4.expand+block4.dw" in [c.node for c in calls if c.op == "expand_depthwise"]
    _assert_steps_match_reference(trainer, model, scheme)
    with pass_config(recompute_masks=False, min_fused_plane=64):
        kept = build_training_module(model, scheme, num_classes=5, kernels=kernels)
    assert [c.node for c in _step_calls(kept) if c.op == "clamp_mask" and c.node.startswith("block4.")][:2] == ["block4.expand", "block4.dw"]
    assert memory_plan(trainer.mod).peak_live_bytes < memory_plan(kept).peak_live_bytes
