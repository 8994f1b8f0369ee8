"""CheckpointMasks: clamp masks held across the step recomputed in the backward from a checkpoint, the same bits."""

from __future__ import annotations

import pytest
import tvm
from conftest import make_random_model, paper_model_path
from test_codegen import CLASSES, LR, assert_pass_keeps_the_bits
from tvm import relax

from relax_passes import CheckpointMasks, PlanMemory, memory_plan, pass_config
from relax_passes._ir import decode
from relax_passes.checkpoint_masks import LOSS_OP, segments
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.importers import load_model
from tvm_tinytrain.trainer import Int8Trainer, build_training_module

SCHEME = "bias-only:4"  # the random model's last four convs: its whole residual block and the strided block after it


def _masks_by_side(mod, name="train_step"):
    """Nodes of the clamp masks made before and after the loss."""
    calls = [decode(mod, b) for b in mod[name].body.blocks[0].bindings]
    loss = next(i for i, c in enumerate(calls) if c is not None and c.op == LOSS_OP)
    made = [(i, c.node) for i, c in enumerate(calls) if c is not None and c.op == "clamp_mask"]
    return [n for i, n in made if i < loss], [n for i, n in made if i > loss]


def test_always_moves_every_mask_into_the_backward_and_c_gives_the_trainers_bits(tmp_path):
    """Every held mask of the random model is made again in the backward (the residual block's from the stem's
    output, through the fused expansion + depthwise kernel, the in-place projection and the residual add; the strided
    block's from its input), and three steps of the Relax VM and of the C step under ASan give the bits of the
    module without the pass."""
    model = make_random_model(5, size=32)
    with pass_config(checkpoint_masks="never"):
        plain = Int8Trainer(model, SCHEME, num_classes=CLASSES, lr=LR)
    with pass_config(checkpoint_masks="always"):
        trainer = Int8Trainer(model, SCHEME, num_classes=CLASSES, lr=LR)
    before, after = _masks_by_side(plain.mod), _masks_by_side(trainer.mod)
    assert len(before[0]) == 5 and not before[1]
    assert not after[0] and sorted(after[1]) == sorted(before[0])
    assert not segments(trainer.mod, "train_step")
    ops = [c.op for b in trainer.mod["train_step"].body.blocks[0].bindings if (c := decode(trainer.mod, b))]
    loss = ops.index(LOSS_OP)
    assert {"expand_depthwise", "pointwise_in_place", "add_int8", "conv2d_requant"} <= set(ops[loss:])

    moved = assert_pass_keeps_the_bits(trainer, plain, tmp_path, (3, 32, 32))
    assert len(moved) >= len(trainer.updated) - 1


def test_at_peak_lowers_proxyless_paper_148kb():
    """Proxyless paper-148kb (without ResidualBackwardInPlace, which then takes block 6's peak below) held the masks of
    its bias-only blocks 5-11 (19 KB) through its trained blocks' peak.
    At its default the pass (run again after the pipeline, then PlanMemory) keeps block 7's output (1.5 KB) and makes block 7's
    projection mask and blocks 8-10's and block 11's expansion and depthwise masks from it in the backward; the
    step's peak moves to block 6's backward, where two 16 KB float32 gradients are alive, so it stops there (block
    5-7's masks from block 5's input would not lower it)."""
    with pass_config(checkpoint_masks="never", residual_backward_in_place="never"):
        mod = build_training_module(load_model(paper_model_path("proxyless-w0.3")), "paper-148kb")
    out = tvm.transform.Sequential([CheckpointMasks(), PlanMemory()])(mod)
    before, after = _masks_by_side(mod), _masks_by_side(out)
    moved = sorted(set(before[0]) - set(after[0]))
    assert moved == sorted(after[1]) and moved == sorted(
        ["blocks[7].pointwise2", *(f"blocks[{b}].{layer}" for b in (8, 9, 10) for layer in ("pointwise1", "depthwise", "pointwise2", "residual")),
         "blocks[11].pointwise1", "blocks[11].depthwise"])
    old, new = memory_plan(mod), memory_plan(out)
    assert old.peak_live_bytes - new.peak_live_bytes > 1900 and new.arena_bytes < old.arena_bytes - 1024
    assert new.timeline[new.peak_index]["node"].startswith("blocks[6].")
    assert CheckpointMasks()(out).same_as(out)  # nothing left that pays


def test_options():
    base = build_training_module(make_random_model(5, size=32), SCHEME)
    assert CheckpointMasks("never")(base).same_as(base)
    with pass_config(recompute_min_saving=1 << 30):  # nothing saves a GB: at-peak leaves the module alone
        assert CheckpointMasks()(base).same_as(base)
    with pytest.raises(TinyTrainError, match="checkpoint_masks is 'sometimes'"):
        CheckpointMasks("sometimes")(base)
    with pass_config(checkpoint_masks="sometimes"), pytest.raises(TinyTrainError, match="checkpoint_masks"):
        build_training_module(make_random_model(5, size=32), SCHEME)


def test_a_slice_reading_a_parameter_updated_before_it_is_no_candidate(monkeypatch):
    """The recomputed slice must read the parameters the forward read. No pipeline of ours updates one of them before
    the slice (each is updated after the backward of its layer, which reads a mask the slice makes), so the guard is
    checked by telling ``segments`` that one parameter is updated at the first binding: the segments whose slices
    read it go, the others stay."""
    from relax_passes import checkpoint_masks

    with pass_config(checkpoint_masks="never"):
        base = build_training_module(make_random_model(5, size=32), SCHEME)
    func = base["train_step"]
    params = set(func.params[int(func.attrs["num_input"]):])
    bindings = list(func.body.blocks[0].bindings)
    found = segments(base, "train_step")
    assert len(found) >= 2

    def slice_params(seg):
        return {a for i in seg.slice for a in decode(base, bindings[i]).args if isinstance(a, relax.Var) and a in params}

    # a parameter some segments' slices read and others' do not
    early = next(p for p in sorted(set().union(*map(slice_params, found)), key=lambda v: v.name)
                 if 0 < sum(p in slice_params(s) for s in found) < len(found))
    real = checkpoint_masks._first_updates
    monkeypatch.setattr(checkpoint_masks, "_first_updates", lambda *args: {**real(*args), early: 0})
    left = segments(base, "train_step")
    assert left and [s.checkpoint for s in left] == [s.checkpoint for s in found if early not in slice_params(s)]
