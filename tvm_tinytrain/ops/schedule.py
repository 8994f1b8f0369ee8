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
element and the compiler can keep the accumulators in registers.  A stage
annotated :data:`STAGE_AT` (an input gradient's real weights) is computed
once per tile of channels into a small workspace buffer instead of at every
read.  Each element still sums its terms in the same order, so both
variants produce the same bits.  The variant in force is set with
:func:`kernel_variant`.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools

import tvm
from tvm import s_tir

from ..errors import TinyTrainError
from ..model import DTYPE_BYTES
from . import _tvmscript_frames  # noqa: F401  (cheaper TVMScript frame lookups; every TIR-written kernel module imports this one)

SPATIAL = 0  # IterVar type of a data-parallel axis
VARIANTS = ("reference", "optimized")
# Output elements per tile, by accumulator type: a Cortex-M has 13 general registers (4 int32 accumulators fit
# beside the pointers) and 32 single-precision ones (8 float accumulators fit).
TILE = {"int32": 4, "float32": 8}

# A stage the schedules keep whole, computed once per call: SparseUpdate's channel table (te_backward.merge_channels).
MERGE_POSITION = "merge_position"
# A reduction's annotation: the output axis to tile first (see tile_reduction).
TILE_AXIS = "tinytrain.tile_axis"
# An element-wise stage's annotation: the loop of its consumer at which the optimized variant computes it (see
# stage_at), instead of inlining it into every read.
STAGE_AT = "tinytrain.stage_at"
MAX_STAGE_BYTES = 4096  # a staged stage's region is a buffer in the C kernel's workspace (an arena slot)

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


KERNEL_CACHE_SIZE = 1024


def cached_kernel(factory):
    """Memoize a PrimFunc factory per kernel variant and arguments (dicts and lists taken by value).

    TVMScript parses a kernel's Python source anew at every call (0.1-0.5 s each), and the passes build the same
    kernels again and again: each fusion pass re-emits every kernel of its kind, RecomputeStreamedExpansion tries
    each candidate, a search plans many schemes.  A PrimFunc is immutable, so the same object can be returned."""
    cache: collections.OrderedDict = collections.OrderedDict()

    @functools.wraps(factory)
    def cached(*args, **kwargs):
        key = (_variant.get(), _frozen(args), _frozen(kwargs))
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        func = cache[key] = factory(*args, **kwargs)
        if len(cache) > KERNEL_CACHE_SIZE:
            cache.popitem(last=False)
        return func

    return cached


def _frozen(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    hash(value)  # a value that cannot be a key is a caller's error, not a cache miss
    return value


def _axes(sch: s_tir.Schedule, block) -> tuple[int, int]:
    """(spatial axes, all axes) of a block: all spatial = element-wise, fewer = a reduction."""
    iters = sch.get(block).iter_vars
    return sum(1 for iv in iters if iv.iter_type == SPATIAL), len(iters)


def compact_schedule(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """The schedule of the variant in force for a PrimFunc fresh from ``te.create_prim_func``."""
    sch = s_tir.Schedule(func)
    tiled = _tile_reductions(sch) if _variant.get() == "optimized" else []
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    for block in sch.get_child_blocks(root):
        if sch.get(block).name_hint in outputs or sch.get(block).name_hint == MERGE_POSITION or stage_at(sch, block):
            continue
        n_spatial, n_iters = _axes(sch, block)
        try:
            if n_spatial == n_iters:
                sch.compute_inline(block)
            elif n_spatial and len(consumers := sch.get_consumers(block)) == 1:
                sch.reverse_compute_at(consumers[0], sch.get_loops(block)[n_spatial - 1])
        except s_tir.ScheduleError:
            continue  # the stage stays whole: correct, only bigger
    for reduction in tiled:
        finish_tile(sch, reduction)
    return sch.mod["main"]


def stage_at(sch: s_tir.Schedule, block) -> bool:
    """In the optimized variant, compute a :data:`STAGE_AT` stage at that loop of its only consumer, once for all
    the consumer's iterations inside it (e.g. a conv's real weights ``float(w) * scale`` once per tile of input
    channels instead of once per multiply-add), when its region there fits :data:`MAX_STAGE_BYTES`.  The values
    are those the inlined expression computes, so the bits do not change.  False: nothing done."""
    loop_index = sch.get(block).annotations.get(STAGE_AT)
    consumers = sch.get_consumers(block)
    if _variant.get() != "optimized" or loop_index is None or len(consumers) != 1:
        return False
    trial = sch.copy()  # to size the staged region first: a schedule step cannot be undone
    try:
        trial.compute_at(block, trial.get_loops(consumers[0])[int(loop_index)])
    except s_tir.ScheduleError:
        return False
    elements = 1
    for lp in trial.get_loops(block)[int(loop_index) + 1:]:  # the loops compute_at made: the region of one iteration
        elements *= int(trial.get(lp).extent)
    if elements * DTYPE_BYTES[str(sch.get(block).writes[0].source.dtype)] > MAX_STAGE_BYTES:
        return False
    sch.compute_at(block, sch.get_loops(consumers[0])[int(loop_index)])
    return True


def _tile_reductions(sch: s_tir.Schedule) -> list[str]:
    """:func:`tile_reduction` of every reduction block; returns the names of those it tiled."""
    tiled = []
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(block).name_hint
        if tile_reduction(sch, block):
            tiled.append(name)
    return tiled


def tile_reduction(sch: s_tir.Schedule, block) -> bool:
    """Split a reduction's innermost tileable output axis and move the tile loop below all the loops after it.

    A reduction that is itself a function output first gets its own accumulator (``cache_write``), whose
    write-back then plays the role of an epilogue.  False (nothing changed) when the block is not a
    reduction or no output axis has a tile size dividing it.
    """
    n_spatial, n_iters = _axes(sch, block)
    if n_spatial in (0, n_iters):
        return False
    loops = sch.get_loops(block)
    widest = TILE.get(str(sch.get(block).writes[0].source.dtype), 4)
    # The innermost output axis a tile size divides: e.g. a conv's output column.  A kernel may name the axis
    # whose operand is the cheaper one to load per tile element (TILE_AXIS): a weight gradient's output channel.
    hint = sch.get(block).annotations.get(TILE_AXIS)
    axes = [int(hint)] if hint is not None else reversed(range(n_spatial))
    choice = next(((k, t) for k in axes for t in (widest, widest // 2, 2)
                   if int(sch.get(loops[k]).extent) % t == 0 and int(sch.get(loops[k]).extent) > 1), None)
    if choice is None:
        return False
    axis, tile = choice
    if sch.get(block).name_hint in {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}:
        sch.cache_write(block, 0, "global")  # compacted to the tile; the C codegen prints only "global" storage
    _, inner = sch.split(loops[axis], [None, tile])
    sch.reorder(*sch.get_loops(block)[axis + 2:], inner)
    if str(sch.get(block).writes[0].source.dtype) == "float32":
        _second_tile_axis(sch, block, axis, tile)
    return True


def _second_tile_axis(sch: s_tir.Schedule, block, axis: int, tile: int) -> None:
    """Rows of the tile along the outermost other output axis that the row count divides (a channel axis in
    these kernels), so each operand loaded for one row serves all: 16 float32 accumulators (2 x 8, or
    4 x 4 when the first tile axis is 4 wide) fit the FPU's 32 registers; int32 ones would not fit the 13
    general registers."""
    loops = sch.get_loops(block)
    n_spatial, _ = _axes(sch, block)
    candidates = [*range(axis), *range(axis + 1, n_spatial)]  # the tile's own axis is now its outer loop at ``axis``
    for rows in dict.fromkeys((min(4, max(2, 16 // tile)), 2)):
        second = next((k for k in candidates if int(sch.get(loops[k]).extent) % rows == 0 and int(sch.get(loops[k]).extent) > rows), None)
        if second is not None:
            break
    else:
        return
    _, row = sch.split(loops[second], [None, rows])
    loops = sch.get_loops(block)
    position = [sch.get(lp).same_as(sch.get(row)) for lp in loops].index(True)
    sch.reorder(*loops[position + 1:-1], row, loops[-1])


def finish_tile(sch: s_tir.Schedule, name: str) -> None:
    """Hoist a tiled reduction's initialisation out of the reduction loops and unroll the innermost tile loops."""
    block = sch.get_sblock(name)
    n_spatial, _ = _axes(sch, block)
    loops = sch.get_loops(block)
    init = sch.decompose_reduction(block, loops[n_spatial])
    for b in (block, init):  # the tile's loops: the last one, and a second tile axis or a short reduction before it
        for lp in sch.get_loops(b)[-2:]:
            if int(sch.get(lp).extent) <= max(TILE.values()):
                sch.unroll(lp)
    for consumer in sch.get_consumers(block):
        last = sch.get_loops(consumer)[-1]
        if int(sch.get(last).extent) <= max(TILE.values()):  # the epilogue of one tile, not e.g. a whole plane row
            sch.unroll(last)
