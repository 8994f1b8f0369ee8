"""ResidualBackwardInPlace: a residual block's backward and skip add in place over its output gradient, the same bits."""

from __future__ import annotations

import pytest
import tvm
from conftest import make_random_model, paper_model_path
from test_codegen import CLASSES, LR, assert_pass_keeps_the_bits

from relax_passes import PlanMemory, ResidualBackwardInPlace, memory_plan, pass_config
from relax_passes._ir import decode
from relax_passes.fuse_depthwise_backward import OP as FUSED_OP
from relax_passes.residual_backward_in_place import OP
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.importers import load_model
from tvm_tinytrain.trainer import Int8Trainer, build_training_module

SCHEME = "bias-only:6"  # every bias of the random model: the backward runs through its residual block to the stem


def _kernels(mod) -> dict[str, list]:
    """op -> the bands (None where there is none) of the calls of that op in ``train_step``."""
    calls = [decode(mod, b) for b in mod["train_step"].body.blocks[0].bindings]
    found: dict[str, list] = {}
    for c in calls:
        if c is not None:
            found.setdefault(c.op, []).append(c.attrs.get("band"))
    return found


def test_always_rewrites_the_residual_block_and_c_gives_the_trainers_bits(tmp_path):
    """The random model's residual block (8 -> 16 -> 8 channels at 16x16, a 5x5 depthwise conv) becomes one kernel
    with the narrowest band (2 rows, the conv's reach) and no skip add; its sum takes the output gradient's storage,
    the step's peak falls (two 8 KB float32 gradients were alive at once), and three steps of the Relax VM and of
    the C step under ASan (where the sum is written over the output gradient) give the bits of the module without
    the pass."""
    model = make_random_model(5, size=32)
    with pass_config(residual_backward_in_place="never"):
        plain = Int8Trainer(model, SCHEME, num_classes=CLASSES, lr=LR)
    with pass_config(residual_backward_in_place="always"):
        trainer = Int8Trainer(model, SCHEME, num_classes=CLASSES, lr=LR)
    before, after = _kernels(plain.mod), _kernels(trainer.mod)
    assert FUSED_OP in before and OP not in before and len(before["add_f32"]) == 1
    assert FUSED_OP not in after and after[OP] == [2] and "add_f32" not in after
    old, new = memory_plan(plain.mod), memory_plan(trainer.mod)
    assert new.peak_live_bytes < old.peak_live_bytes - 6 * 1024
    bindings = list(trainer.mod["train_step"].body.blocks[0].bindings)
    index = next(i for i, b in enumerate(bindings) if (c := decode(trainer.mod, b)) is not None and c.op == OP)
    out = next(b for b in new.buffers if b["start"] == index and len(b["name"].split("[")) == 2 and b["name"].endswith("[0]"))
    operand = new.buffers[out["alias"]] if out["alias"] is not None else None
    assert operand is not None and operand["kind"] == "gradient" and operand["start"] < index  # over the output gradient it reads

    assert "stem_bias" in assert_pass_keeps_the_bits(trainer, plain, tmp_path, (3, 32, 32))  # the gradient passed the block


def test_at_peak_lowers_proxyless_paper_148kb():
    """Proxyless paper-148kb peaked at block 6's backward (41.4 KB: the block's 16 KB output gradient, which the
    skip path reads after the branch, and the branch's 16 KB input gradient).  The pass writes the sum over the output
    gradient with the widest band that leaves the same peak within a kernel's workspace limit; the peak moves to block
    19's backward (37.9 KB), where no residual block helps: nothing left that pays."""
    with pass_config(residual_backward_in_place="never"):
        mod = build_training_module(load_model(paper_model_path("proxyless-w0.3")), "paper-148kb")
    old = memory_plan(mod)
    assert old.timeline[old.peak_index]["node"].startswith("blocks[6].") and old.peak_live_bytes > 41 * 1024
    out = tvm.transform.Sequential([ResidualBackwardInPlace(), PlanMemory()])(mod)
    new = memory_plan(out)
    assert new.peak_live_bytes < 38 * 1024 and new.timeline[new.peak_index]["node"].startswith("blocks[19].")
    assert _kernels(out)[OP] == [4]  # 8 rows would pass the 8 KB workspace limit; 2 rows would leave the same peak
    assert ResidualBackwardInPlace()(out).same_as(out)


def test_options():
    base = build_training_module(make_random_model(5, size=32), SCHEME)
    with pass_config(residual_backward_in_place="never"):
        plain = build_training_module(make_random_model(5, size=32), SCHEME)
    assert OP in _kernels(base) and OP not in _kernels(plain)  # at-peak: the block is the random model's peak
    assert ResidualBackwardInPlace("never")(plain).same_as(plain)
    with pass_config(recompute_min_saving=1 << 30):  # nothing saves a GB: at-peak leaves the module alone
        assert ResidualBackwardInPlace()(plain).same_as(plain)
    with pytest.raises(TinyTrainError, match="residual_backward_in_place is 'sometimes'"):
        ResidualBackwardInPlace("sometimes")(plain)
