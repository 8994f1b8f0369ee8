"""NarrowPeakTiles: a fused block backward at the step's peak builds fewer planes at a time.

In the optimized variant FuseDepthwiseBackward's kernel builds up to 8 masked
float32 planes of the expanded width at a time (as many as divide the
channels and fit ``max_plane_bytes``), so each pass over the expansion's
input gradient serves them all.  Those planes are the kernel's workspace,
alive while it runs: 4 KB for four 16x16 planes.  Where that kernel is where
the function peaks, the tile costs its bytes at the peak; e.g. Proxyless
``paper-148kb``'s block 6 backward, beside two 16 KB float32 gradients.

This pass looks at the op where the function with the module's highest peak
of live bytes peaks (the C step functions share one arena).  While that op
is a fused block backward with more than one plane per tile and one plane at
a time would lower the peak at all (option ``narrow_peak_tiles``, on by
default: a narrower tile costs a few more passes over the expansion's input
gradient, no recomputation), it rebuilds the kernel with the widest tile
dividing the channels that lowers the peak as much, and looks again.  The
tile only orders the planes' work, so the bits are the same.  Run it before
and after CheckpointMasks, as each can move the peak to where the other
lowers it: with the two, Proxyless ``paper-148kb`` plans at 41.4 KB of arena
in the optimized variant as in the reference one (46.2 KB before), where
neither alone lowers it by 1 KB.

Before (4 planes of 16x16 at a time, 6 KB of workspace)::

    lv23 = R.call_tir(cls.depthwise_block_backward, (lv253, lv23m, w2, ...), ...)  # tinytrain.tile = 4

After: the same call of a kernel with ``tinytrain.tile = 1`` (1.9 KB of workspace).
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from ._buffers import analyze
from ._fusion import reemit, relax_function_names
from ._ir import decode
from .config import option
from .fuse_depthwise_backward import OP, TRAINED_OP, retiled
from .plan_memory import live_floor_timeline


def _peak(mod: tvm.IRModule, name: str) -> tuple[int, int]:
    """(live bytes, binding index) where function ``name`` peaks."""
    timeline = live_floor_timeline(analyze(mod, mod[name]).buffers)
    index = max(timeline, key=timeline.__getitem__, default=0)
    return timeline.get(index, 0), index


def _tiles(mod: tvm.IRModule, name: str, index: int) -> list[int]:
    """The smaller tiles, largest first, of the fused block backward at binding ``index`` of function ``name`` (none
    where that binding is no such kernel)."""
    call = decode(mod, mod[name].body.blocks[0].bindings[index])
    if call is None or call.op not in (OP, TRAINED_OP):
        return []
    channels = int(json.loads(call.attrs["form"])["channels"])
    return [t for t in range(int(call.attrs.get("tile", 1)) - 1, 0, -1) if channels % t == 0]


def _retile(mod: tvm.IRModule, name: str, index: int, tile: int) -> tvm.IRModule:
    """``mod`` with the fused block backward at binding ``index`` of function ``name`` built with ``tile``."""
    binding = mod[name].body.blocks[0].bindings[index]
    prim = retiled(mod[decode(mod, binding).gvar], tile)

    def emit(bb, b) -> bool:
        if not b.var.same_as(binding.var):
            return False
        gv = bb.add_func(prim, str(prim.attrs["tinytrain.op"]))
        value = b.value
        bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(relax.Call(value.op, [gv, *value.args[1:]], value.attrs, value.ty_args))))
        return True

    return reemit(mod, name, emit)


@tvm.transform.module_pass(opt_level=0, name="NarrowPeakTiles")
class NarrowPeakTiles:
    """Rebuild the fused block backward where the step peaks with fewer planes per tile while that lowers the peak by
    ``min_saving`` bytes (1: at all) (option ``narrow_peak_tiles``); run after the fusions, before PlanMemory."""

    def __init__(self, enabled: bool | None = None, min_saving: int | None = None):
        self.enabled, self.min_saving = enabled, min_saving

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not option("narrow_peak_tiles", self.enabled):
            return mod
        min_saving = 1 if self.min_saving is None else int(self.min_saving)
        names = relax_function_names(mod, "NarrowPeakTiles")
        if not names:
            return mod
        peaks = {name: _peak(mod, name) for name in names}
        while True:
            name = max(names, key=lambda n: peaks[n][0])
            tiles = _tiles(mod, name, peaks[name][1])
            if not tiles:
                return mod
            # the least this kernel can leave (one plane at a time), then the widest tile that leaves no more
            narrowest = _retile(mod, name, peaks[name][1], tiles[-1])
            floor = _peak(narrowest, name)
            if peaks[name][0] - floor[0] < min_saving:
                return mod
            for tile in tiles:
                trial = narrowest if tile == tiles[-1] else _retile(mod, name, peaks[name][1], tile)
                if (peak := floor if trial is narrowest else _peak(trial, name))[0] <= floor[0]:
                    break
            mod, peaks[name] = trial, peak
