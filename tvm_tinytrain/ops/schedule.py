"""The TIR schedules of the kernels: the reference one, and an optimized one beside it.

TE builds a kernel as stages that each write a whole intermediate tensor.
On a microcontroller those tensors are RAM, so before lowering we move each
stage next to its use: element-wise producers are inlined into their
consumers, and the element-wise epilogue of a reduction (requantize after a
conv sum, the QAS scale after a weight-gradient sum) is computed inside the
reduction's output loop, where TVM's buffer compaction shrinks the
accumulator to a scalar.  That is the ``reference`` variant: one output
element at a time, the plainest loop nest.

The ``optimized`` variant computes a tile of :data:`TILE` neighbouring output
elements (along the innermost output axis) together: their accumulators are
a small local array, the reduction's initialisation moves out of the
reduction loop, and the tile loop is innermost and unrolled, so every weight
(and its float conversion) is loaded once per tile instead of once per
element and the compiler can keep the accumulators in registers.  Each
element still sums its terms in the same order, so both variants produce
the same bits.  The variant in force is set with :func:`kernel_variant`.
"""

from __future__ import annotations

import contextlib
import contextvars

import tvm
from tvm import s_tir

from ..errors import TinyTrainError

SPATIAL = 0  # IterVar type of a data-parallel axis
VARIANTS = ("reference", "optimized")
TILE = 4  # output elements per tile: 4 int32/float accumulators fit Cortex-M registers beside the pointers

_variant: contextvars.ContextVar[str] = contextvars.ContextVar("tinytrain_kernel_variant", default="reference")


@contextlib.contextmanager
def kernel_variant(name: str):
    """Schedule the kernels built inside the ``with`` body with variant ``name`` (see the module doc)."""
    if name not in VARIANTS:
        raise TinyTrainError(f"unknown kernel variant {name!r}; known: {', '.join(VARIANTS)}")
    token = _variant.set(name)
    try:
        yield
    finally:
        _variant.reset(token)


def current_variant() -> str:
    return _variant.get()


def compact_schedule(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """The schedule of the variant in force for a PrimFunc fresh from ``te.create_prim_func``."""
    sch = s_tir.Schedule(func)
    tiled = _tile_reductions(sch) if _variant.get() == "optimized" else []
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for block in sch.get_child_blocks(root):
        if sch.get(block).name_hint in outputs:
            continue
        iters = sch.get(block).iter_vars
        n_spatial = sum(1 for iv in iters if iv.iter_type == SPATIAL)
        try:
            if n_spatial == len(iters):
                sch.compute_inline(block)
            elif n_spatial and len(consumers := sch.get_consumers(block)) == 1:
                sch.reverse_compute_at(consumers[0], sch.get_loops(block)[n_spatial - 1])
        except s_tir.ScheduleError:
            continue  # the stage stays whole: correct, only bigger
    for reduction in tiled:
        _finish_tile(sch, reduction)
    return sch.mod["main"]


def _tile_reductions(sch: s_tir.Schedule) -> list[str]:
    """Split each reduction's innermost output axis into tiles and move the tile loop below the reduction loops.

    A reduction that is itself a function output first gets its own accumulator (``cache_write``), whose
    write-back then plays the role of an epilogue.  Returns the names of the tiled reductions.
    """
    tiled = []
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for block in sch.get_child_blocks(root):
        iters = sch.get(block).iter_vars
        n_spatial = sum(1 for iv in iters if iv.iter_type == SPATIAL)
        if n_spatial in (0, len(iters)):
            continue
        loops = sch.get_loops(block)
        extent = int(sch.get(loops[n_spatial - 1]).extent)
        tile = next((t for t in (TILE, 2) if extent % t == 0 and extent > t), None)
        if tile is None:
            continue
        if sch.get(block).name_hint in outputs:
            sch.cache_write(block, 0, "global")  # compacted to the tile; the C codegen prints only "global" storage
        _, inner = sch.split(loops[n_spatial - 1], [None, tile])
        sch.reorder(*sch.get_loops(block)[n_spatial + 1:], inner)
        tiled.append(sch.get(block).name_hint)
    return tiled


def _finish_tile(sch: s_tir.Schedule, name: str) -> None:
    """Hoist the tile's initialisation out of the reduction loops and unroll the innermost tile loops."""
    block = sch.get_sblock(name)
    iters = sch.get(block).iter_vars
    n_spatial = sum(1 for iv in iters if iv.iter_type == SPATIAL)
    loops = sch.get_loops(block)
    init = sch.decompose_reduction(block, loops[n_spatial])
    sch.unroll(sch.get_loops(block)[-1])
    sch.unroll(sch.get_loops(init)[-1])
    for consumer in sch.get_consumers(block):
        sch.unroll(sch.get_loops(consumer)[-1])
