"""PlanMemory: one static arena for a training step, with byte offsets and a proof of no overlap.

Every buffer of ``train_step`` (see ``_buffers.py``: kernel outputs, masks,
gradients, kernel workspaces, the image unless StreamInputRows streams it) gets
a fixed offset in one arena.
Offsets come from a greedy first-fit over lifetimes, in a few orders and then in
orders a local search finds (the tightest kept, see :func:`assign_offsets`);
an element-wise gradient kernel whose operand dies there writes in place
(the output aliases the operand's storage, see ``_buffers.py``).
:func:`validate_plan` then checks that no two buffers alive at the same time
share a byte, so the C step function can use the offsets as they are.

Peak SRAM = arena + trainable parameters kept in RAM (the frozen ones and the
fixed-point constants are ``const``, in flash).  The plan and its report go to
the function attribute ``tinytrain.memory_plan`` (JSON), and
:func:`memory_plan` returns them as a :class:`MemoryPlan`.

Before::

    def train_step(input, label, lr, ...):
        lv = R.call_tir(cls.conv2d_acc, ...)

After: the same function, with ``R.func_attr({"tinytrain.memory_plan": "{\\"arena_bytes\\": 150528, ...}"})``.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

import tvm
import tvm_ffi
from tvm import relax

from tvm_tinytrain.errors import TinyTrainError

from ._buffers import Buffer, analyze, live_bytes_timeline, live_span, storage_buffers
from ._ir import get_function, with_function
from .config import option


@dataclass
class MemoryPlan:
    arena_bytes: int  # the arena's size: offsets + sizes, fragmentation included
    peak_live_bytes: int  # most bytes alive at once (the arena's lower bound)
    trainable_param_bytes: int
    frozen_param_bytes: int  # flash
    peak_index: int
    peak_parts: dict[str, int]  # bytes by kind at the peak (masks, activations, gradients, ...)
    timeline: list[dict]  # per op: index, op, node, bytes by kind
    buffers: list[dict]  # name, size, start, end, kind, offset
    kernel_local_bytes: int = 1024  # kernels' internal buffers this small are C locals, left out of the workspaces
    live_spans: list = field(default_factory=list)  # per buffer: [first, last] op its own bytes are alive at, or None

    @property
    def peak_sram_bytes(self) -> int:
        return self.arena_bytes + self.trainable_param_bytes

    def report(self) -> dict:
        return {
            "peak_sram_bytes": self.peak_sram_bytes,
            "parts": {
                "arena_bytes": self.arena_bytes,
                "trainable_param_bytes": self.trainable_param_bytes,
                **{f"peak_{k}_bytes": v for k, v in self.peak_parts.items()},
            },
            "peak_live_bytes": self.peak_live_bytes,
            "input_streamed": any(b.get("streamed") for b in self.buffers),  # StreamInputRows: the image is not in RAM
            "frozen_param_bytes_flash": self.frozen_param_bytes,
            "peak_op": self.timeline[self.peak_index] if self.timeline else None,
        }

    def live_at(self, index: int) -> list[dict]:
        """The buffers whose bytes make up op ``index``'s row of the timeline, largest first: each buffer's index in
        :attr:`buffers` (Relax names repeat), name, kind, size, offset, and the ops that write it and read it last
        (with their nodes: the model's layers)."""
        if not 0 <= index < len(self.timeline):
            raise TinyTrainError(f"op index {index} is out of range: the step has ops 0..{len(self.timeline) - 1}")

        def node(i: int) -> str:
            if not 0 <= i < len(self.timeline):
                return "the function's inputs" if i < 0 else "the function's results"
            return self.timeline[i]["node"] or "no kernel: a tuple or one of its fields"

        rows = [{"buffer": i, "name": b["name"], "kind": b["kind"], "size": b["size"], "offset": b["offset"], "written_at": b["start"],
                 "written_by": node(b["start"]), "last_read_at": b["end"], "last_read_by": node(b["end"])}
                for i, (b, span) in enumerate(zip(self.buffers, self.live_spans)) if span is not None and span[0] <= index <= span[1]]
        return sorted(rows, key=lambda r: (-r["size"], r["written_at"]))


# Orders in which assign_offsets places buffers (by the buffer an overwriting chain starts from): greedy placement has
# no best order, and which packs tightest depends on the step, so each is tried and the smallest arena kept.
PLACEMENT_ORDERS = {
    "largest first": lambda b: (-b.size, b.start),
    "earliest first": lambda b: (b.start, -b.size),
    "longest-lived first": lambda b: (b.start - b.end, -b.size),
    "largest area first": lambda b: (-b.size * (b.end - b.start + 1), b.start),
}


def assign_offsets(buffers: list[Buffer], alignment: int, search_steps: int = 0) -> int:
    """Greedy first-fit in each of :data:`PLACEMENT_ORDERS`: each buffer takes the lowest aligned gap free for its
    lifetime, or a place over the operand it overwrites (placed just before it: its start or, where the kernel
    allows, flush with its end) when that is free but for the operand; aliases share their storage's.

    Then a seeded (so reproducible) local search from each of those orders, ``search_steps`` swaps of two buffers
    in all: a swap is kept when the arena does not grow and no fewer outputs lie over their operands.  The orders'
    arenas lie on plateaus that a swap rarely leaves, and which order's plateau holds the tightest placement
    differs from step to step, so each order gets its share.  A search stops at :func:`live_floor`, which no
    placement beats, or after :data:`SEARCH_PATIENCE` swaps without a gain.  Returns the smallest arena found,
    with the buffers placed for it."""
    floor = _align(live_floor(buffers), alignment)
    neighbours = _neighbours(buffers)
    results = []
    for i, key in enumerate(PLACEMENT_ORDERS.values()):
        order = _sequence(buffers, key)
        rank = {id(b): k for k, b in enumerate(order)}  # by buffer: Relax names repeat
        roots = [b for b in order if b.overwrites is None]  # an overwriting output is placed by its root's rank alone
        steps = search_steps // len(PLACEMENT_ORDERS) if len(roots) > 1 else 0
        results.append(_local_search(buffers, alignment, roots, rank, steps, floor, random.Random(i), neighbours))
        if results[-1][0][0] <= floor:
            break
    _, rank = min(results, key=lambda r: r[0])
    return _place(buffers, alignment, lambda x: (rank[id(x)],), neighbours)


def _local_search(buffers: list[Buffer], alignment: int, roots: list[Buffer], rank: dict, steps: int, floor: int, rng,
                  neighbours: dict[int, list[Buffer]]):
    """((arena, -outputs in place), rank) after up to ``steps`` kept-or-undone swaps from ``rank``."""
    def score(order) -> tuple[int, int]:
        return _place(buffers, alignment, order, neighbours), -sum(b.in_place(buffers) for b in buffers)

    best, since = score(lambda x: (rank[id(x)],)), 0
    for _ in range(steps):
        if best[0] <= floor or since >= SEARCH_PATIENCE:
            break
        a, b = rng.sample(roots, 2)
        trial = {**rank, id(a): rank[id(b)], id(b): rank[id(a)]}
        result = score(lambda x: (trial[id(x)],))
        since = 0 if result[0] < best[0] else since + 1
        if result <= best:  # sideways moves too: they let the search cross plateaus
            best, rank = result, trial
    return best, rank


def live_floor_timeline(buffers: list[Buffer]) -> dict[int, int]:
    """Bytes alive at each binding, each output that may overwrite its operand counted as if it did (from after its
    kernel)."""
    live: dict[int, int] = {}
    for b in storage_buffers(buffers):
        for t in range(b.start + (b.overwrites is not None), b.end + 1):
            live[t] = live.get(t, 0) + b.size
    return live


def live_floor(buffers: list[Buffer]) -> int:
    """The most bytes alive at once, as :func:`live_floor_timeline` counts them: no placement's arena is smaller."""
    return max(live_floor_timeline(buffers).values(), default=0)


def function_live_floor(mod: tvm.IRModule, name: str) -> int:
    """:func:`live_floor` of function ``name``'s buffers: what the passes that trade instructions for memory lower."""
    return live_floor(analyze(mod, mod[name]).buffers)


SEARCH_PATIENCE = 600  # swaps without a smaller arena before the local search gives up


def _sequence(buffers: list[Buffer], primary) -> list[Buffer]:
    """The storage buffers in the order :func:`_place` places them, by ``primary``."""
    def order(b: Buffer):  # a buffer that overwrites another comes right after it, before anything can take its place
        depth = 0
        while b.overwrites is not None:
            b, depth = buffers[b.overwrites], depth + 1
        return *primary(b), b.name, depth

    return sorted(storage_buffers(buffers), key=order)


def _align(v: int, alignment: int) -> int:
    return (v + alignment - 1) // alignment * alignment


def _neighbours(buffers: list[Buffer]) -> dict[int, list[Buffer]]:
    """Per storage buffer (by id), the storage buffers alive at some time it is: all :func:`_place` must avoid."""
    storage = sorted(storage_buffers(buffers), key=lambda b: b.start)
    near: dict[int, list[Buffer]] = {id(b): [] for b in storage}
    for i, a in enumerate(storage):
        for b in storage[i + 1:]:
            if b.start > a.end:
                break
            near[id(a)].append(b)
            near[id(b)].append(a)
    return near


def _place(buffers: list[Buffer], alignment: int, primary, neighbours: dict[int, list[Buffer]] | None = None) -> int:
    """Place the storage buffers first-fit in the order ``primary`` gives (see :func:`assign_offsets`); the arena.
    ``neighbours`` (:func:`_neighbours` of these buffers) saves recomputing who overlaps whom on each call."""
    neighbours = neighbours if neighbours is not None else _neighbours(buffers)
    for b in buffers:
        b.offset = None
    for b in _sequence(buffers, primary):
        alive = [p for p in neighbours[id(b)] if p.offset is not None]  # placed already
        target = buffers[b.overwrites] if b.overwrites is not None else None
        spots = b.in_place_offsets(buffers) if target is not None and target.offset is not None else ()
        free = [o for o in spots if not any(p is not target and p.offset < o + b.size and o < p.offset + p.size for p in alive)]
        if free:
            b.offset = free[0]  # in place over the dying operand: nothing else is there
        else:
            b.offset = 0
            for lo, hi in sorted((p.offset, p.offset + p.size) for p in alive):
                if b.offset + b.size <= lo:
                    break
                b.offset = max(b.offset, _align(hi, alignment))
    for b in buffers:
        if b.alias is not None:
            b.offset = buffers[b.alias].offset
    return max((b.offset + b.size for b in buffers if b.offset is not None), default=0)


def validate_plan(buffers: list[Buffer]) -> None:
    """Raise if two buffers alive at the same time overlap in the arena (an alias is checked as its storage)."""
    for b in buffers:
        if b.alias is not None and (b.offset != buffers[b.alias].offset or not buffers[b.alias].start <= b.start <= b.end <= buffers[b.alias].end):
            raise TinyTrainError(f"PlanMemory: buffer {b.name!r} aliases {buffers[b.alias].name!r} outside its storage or lifetime")
    by_offset = sorted(storage_buffers(buffers), key=lambda b: b.offset)
    for i, a in enumerate(by_offset):
        for b in by_offset[i + 1:]:
            if b.offset >= a.offset + a.size:
                break
            if a.overlaps_in_time(b) and a.size and b.size and not _meet_in_place(a, b, buffers):
                raise TinyTrainError(f"PlanMemory: buffers {a.name!r} [{a.offset}, {a.offset + a.size}) and {b.name!r} "
                                     f"[{b.offset}, {b.offset + b.size}) overlap while both are alive")


def _meet_in_place(a: Buffer, b: Buffer, buffers: list[Buffer]) -> bool:
    """Whether one overwrites the other in place: at a place its kernel allows, alive together only at its kernel."""
    for out, operand in ((a, b), (b, a)):
        if out.in_place(buffers) and buffers[out.overwrites] is operand and operand.end == out.start:
            return True
    return False


def plan(mod: tvm.IRModule, func_name: str = "train_step", alignment: int = 16, search_steps: int = 0) -> MemoryPlan:
    func = get_function(mod, func_name, "PlanMemory")
    sb = analyze(mod, func)
    arena = assign_offsets(sb.buffers, alignment, search_steps)
    validate_plan(sb.buffers)
    timeline = live_bytes_timeline(sb)
    totals = [sum(t.values()) for t in timeline]
    peak = max(range(len(totals)), key=totals.__getitem__) if totals else 0
    rows = [{"index": i, "op": sb.ops[i], "node": sb.nodes[i], **t} for i, t in enumerate(timeline)]
    return MemoryPlan(arena, totals[peak] if totals else 0, sb.trainable_bytes, sb.frozen_bytes, peak,
                      dict(timeline[peak]) if timeline else {}, rows, [asdict(b) for b in sb.buffers], int(option("kernel_local_bytes")),
                      [live_span(b, sb.buffers, len(timeline)) for b in sb.buffers])


PLAN_ATTRS = ("tinytrain.memory_plan", "tinytrain.memory_plan_of")  # the plan, and the fingerprint of what it planned


def _fingerprint(mod: tvm.IRModule, func_name: str) -> str:
    """A hash of function ``func_name`` (its plan attributes left out) and the kernels it calls: what a plan depends on."""
    func = mod[func_name]
    for attr in PLAN_ATTRS:
        func = func.without_attr(attr)
    callees = sorted({gv.name_hint for gv in relax.analysis.all_global_vars(func)})
    return str(tvm_ffi.structural_hash([func, *(mod[name] for name in callees)]))


def memory_plan(mod: tvm.IRModule, func_name: str = "train_step") -> MemoryPlan:
    """The plan PlanMemory attached to ``func_name``; an error if the function or its kernels changed since."""
    func = get_function(mod, func_name, "memory_plan")
    if not func.attrs or PLAN_ATTRS[0] not in func.attrs:
        raise TinyTrainError(f"function {func_name!r} has no memory plan; run PlanMemory first")
    if PLAN_ATTRS[1] not in func.attrs or str(func.attrs[PLAN_ATTRS[1]]) != _fingerprint(mod, func_name):
        raise TinyTrainError(f"the memory plan of {func_name!r} is out of date: the function or its kernels changed after "
                             "PlanMemory (run PlanMemory last)")
    return MemoryPlan(**json.loads(str(func.attrs[PLAN_ATTRS[0]])))


@tvm.transform.module_pass(opt_level=0, name="PlanMemory")
class PlanMemory:
    """Attach a validated static arena plan to ``train_step``."""

    def __init__(self, func_name: str = "train_step", alignment: int | None = None, placement_search: int | None = None):
        self.func_name = func_name
        self.alignment = alignment
        self.placement_search = placement_search

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        result = plan(mod, self.func_name, int(option("alignment", self.alignment)),
                      int(option("placement_search", self.placement_search)))
        func = mod[self.func_name].with_attrs({PLAN_ATTRS[0]: json.dumps(asdict(result)), PLAN_ATTRS[1]: _fingerprint(mod, self.func_name)})
        return with_function(mod, self.func_name, func)
