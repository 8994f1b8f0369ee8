"""The passes on input they do not take, as a TVM user may compose them: a one-line TinyTrainError naming the pass,
function, option or field, not a crash deep inside, a hang or a silently wrong module."""

from __future__ import annotations

import pytest
import tvm
from conftest import make_random_model
from tvm import relax

from relax_passes import (
    AppendLoss,
    CheckpointMasks,
    FuseConvRequant,
    NarrowPeakTiles,
    PlanMemory,
    QuantizedGradient,
    RecomputeStreamedExpansion,
    ReorderUpdates,
    SparseUpdate,
    memory_plan,
    pass_config,
)
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.relax_build import build_relax
from tvm_tinytrain.scheme import SparseScheme


@pytest.fixture(scope="module")
def inference():
    return build_relax(make_random_model(0))[0]


@pytest.fixture(scope="module")
def step(inference):
    return QuantizedGradient()(AppendLoss()(inference))


def _two_blocks() -> tvm.IRModule:
    """A plain Relax train_step of TVM's own ops: a dataflow block, then a binding block."""
    bb = relax.BlockBuilder()
    x, w = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32")), relax.Var("w", relax.TensorType((4, 3, 3, 3), "float32"))
    with bb.function("train_step", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, w))
        bb.emit_func_output(bb.emit(relax.op.nn.relu(y)))
    return bb.get()


@pytest.mark.parametrize("option, value, message", [
    ("qas", "False", "pass option qas = 'False' must be True or False"),
    ("alignment", 0, r"pass option alignment = 0 must be in \[1, 4096\]"),
    ("alignment", 24, "pass option alignment = 24 must be a power of two"),
    ("kernel_local_bytes", -1, r"pass option kernel_local_bytes = -1 must be in \[0, inf\]"),
    ("num_classes", 2.5, "pass option num_classes = 2.5 must be an integer"),
    ("recompute_min_saving", 0, r"pass option recompute_min_saving = 0 must be in \[1, inf\]"),
])
def test_bad_option_values_name_the_option(option, value, message):
    with pytest.raises(TinyTrainError, match=message), pass_config(**{option: value}):
        pass


@pytest.mark.parametrize("make, message", [
    (lambda inf, st: AppendLoss(5)(AppendLoss()(inf)), "AppendLoss: the module has its loss already"),
    (lambda inf, st: QuantizedGradient()(st), "QuantizedGradient: the module has a train_step already"),
    (lambda inf, st: SparseUpdate("full")(SparseUpdate("last-k:2")(st)), "already pruned to scheme 'last-k:2'"),
    (lambda inf, st: SparseUpdate("last-k:3")(FuseConvRequant()(st)), "has no conv2d_acc kernels: run it right after QuantizedGradient"),
    (lambda inf, st: QuantizedGradient(qas="no")(AppendLoss()(inf)), "pass option qas = 'no' must be True or False"),
    (lambda inf, st: CheckpointMasks(min_saving=0)(st), "recompute_min_saving = 0"),  # it looped for ever
    (lambda inf, st: SparseUpdate(SparseScheme(2, (1.5,), (1.0,)))(st), "field 'weight_idx' has 1.5, not an integer"),
    (lambda inf, st: FuseConvRequant(func_names="train_step")(st), "FuseConvRequant: func_names must be a list of function names"),
    (lambda inf, st: FuseConvRequant(func_names=("nope",))(st), "FuseConvRequant: the module has no Relax function 'nope'"),
    (lambda inf, st: FuseConvRequant()(_two_blocks()), r"FuseConvRequant \('train_step'\): expected a function with exactly one dataflow"),
    (lambda inf, st: ReorderUpdates()(_two_blocks()), r"ReorderUpdates \('train_step'\): expected a function with exactly one dataflow"),
    (lambda inf, st: memory_plan(ReorderUpdates()(PlanMemory()(SparseUpdate("last-k:3")(st)))),
     "the memory plan of 'train_step' is out of date"),
])
def test_misuse_is_a_clear_error(inference, step, make, message):
    with pytest.raises(TinyTrainError, match=message):
        make(inference, step)


def test_repeats_and_empty_modules_change_nothing(step):
    sparse = SparseUpdate("last-k:2")(step)
    tvm.ir.assert_structural_equal(SparseUpdate("last-k:2")(sparse), sparse)
    for p in (NarrowPeakTiles(), CheckpointMasks(), RecomputeStreamedExpansion()):
        assert len(p(tvm.IRModule()).functions) == 0
    planned = PlanMemory()(sparse)
    assert memory_plan(PlanMemory(func_name="infer")(planned)) == memory_plan(planned)  # infer's plan leaves train_step's current
