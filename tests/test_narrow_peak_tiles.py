"""NarrowPeakTiles: the fused block backward where the step peaks rebuilt with fewer planes per tile."""

from __future__ import annotations

import json

import pytest
import tvm
from conftest import paper_model_path

from relax_passes import CheckpointMasks, NarrowPeakTiles, PlanMemory, memory_plan, pass_config
from relax_passes._ir import decode
from relax_passes.fuse_depthwise_backward import OP, TRAINED_OP
from tvm_tinytrain.importers import load_model
from tvm_tinytrain.ops.schedule import kernel_variant
from tvm_tinytrain.ops.tir_backward import depthwise_block_backward
from tvm_tinytrain.trainer import build_training_module


def _tiles(mod) -> dict[str, int]:
    calls = [decode(mod, b) for b in mod["train_step"].body.blocks[0].bindings]
    return {c.node: int(c.attrs["tile"]) for c in calls if c is not None and c.op in (OP, TRAINED_OP)}


@pytest.fixture(scope="module")
def base():
    """Optimized Proxyless paper-148kb without either pass."""
    with pass_config(checkpoint_masks="never", narrow_peak_tiles=False, residual_backward_in_place="never"):
        return build_training_module(load_model(paper_model_path("proxyless-w0.3")), "paper-148kb", kernels="optimized")


def test_proxyless_paper_148kb_optimized_plans_as_the_reference(base):
    """Optimized Proxyless paper-148kb peaked at block 6's backward, whose kernel built four 16x16 planes at a time
    (6 KB of workspace beside two 16 KB gradients): 46.2 KB of arena where the reference variant's one plane at a time
    plans 41.4 KB with CheckpointMasks.  CheckpointMasks alone cannot lower that peak; NarrowPeakTiles alone lowers it
    by one plane until block 14's backward is the peak; the two together (block 6's kernel narrowed to one plane,
    block 14's from 8 to 4), as the pipeline runs them, reach the
    reference variant's plan.  Each narrowed kernel is the one FuseDepthwiseBackward would build with that tile."""
    arena = memory_plan(base).arena_bytes
    assert arena > 46 * 1024
    assert memory_plan(tvm.transform.Sequential([CheckpointMasks(), PlanMemory()])(base)).arena_bytes == arena
    alone = tvm.transform.Sequential([NarrowPeakTiles(), PlanMemory()])(base)
    assert memory_plan(alone).peak_live_bytes < memory_plan(base).peak_live_bytes
    both = tvm.transform.Sequential([NarrowPeakTiles(), CheckpointMasks(), NarrowPeakTiles(), PlanMemory()])(base)
    plan = memory_plan(both)
    assert plan.arena_bytes < 41.5 * 1024 and plan.timeline[plan.peak_index]["node"].startswith("blocks[6].")
    before, after = _tiles(base), _tiles(both)
    narrowed = {n: t for n, t in after.items() if t != before[n]}
    assert {n.split("+")[0]: t for n, t in narrowed.items()} == {"blocks[6].pointwise2": 1, "blocks[14].pointwise2": 4}
    assert before["blocks[6].pointwise2+blocks[6].depthwise+blocks[6].pointwise1"] == 4
    calls = {c.node: c for b in both["train_step"].body.blocks[0].bindings if (c := decode(both, b)) is not None}
    for node, tile in narrowed.items():
        form = json.loads(calls[node].attrs["form"])
        form.update(merged=tuple(form["merged"]) if form["merged"] else None, recompute=tuple(form["recompute"]) if form["recompute"] else None)
        with kernel_variant("optimized"):
            direct = depthwise_block_backward(**form, tile=tile)
        tvm.ir.assert_structural_equal(both[calls[node].gvar].body, direct.body)


def test_options(base):
    assert not NarrowPeakTiles()(base).same_as(base)
    with pass_config(narrow_peak_tiles=False):
        assert NarrowPeakTiles()(base).same_as(base)
    assert NarrowPeakTiles(False)(base).same_as(base)
    assert NarrowPeakTiles(min_saving=1 << 30)(base).same_as(base)
