"""CheckpointMasks: clamp masks held from the forward to the backward are recomputed there from a checkpoint.

A layer whose bias is trained but whose weights are frozen needs nothing of
its forward in the backward but its 1-bit clamp masks (QuantizedGradient).
Those masks are made in the forward and read when the backward reaches the
layer, so they are alive across everything in between: the whole forward of
the later layers and their backward.  In Proxyless' ``paper-148kb`` the bias-only
blocks 5-11 hold 19 KB of masks that way, beside the trained blocks' peak.

This pass keeps one activation instead (the *checkpoint*, e.g. 1.5 KB where
those blocks narrow to 24 channels at 8x8) and re-emits the slice of the
forward that makes the masks from it right before the backward's first reader
of any of them, so the masks live only from there on.  A segment is one
checkpoint with the held masks computable from it alone (through frozen
weights, biases and constants, and no activation the backward keeps anyway,
which would be a checkpoint of its own); the forward's own clamp masks of the
segment are dropped.  The recomputed slice reads its parameters before the
backward updates any of them (segments where that is not so are not
candidates), and the re-emitted calls run the same PrimFuncs, so the bits do
not change, in the Relax VM or in C.

Recomputing costs the slice's instructions once more, so by default (option
``checkpoint_masks="at-peak"``) a segment is recomputed only in the function
whose peak of live bytes is the module's highest (the C step functions share
one arena), and only when it lowers that peak by at least
``recompute_min_saving`` bytes.  The candidates are ranked by the peak they
would leave, estimated on the function's liveness (the masks gone until the
recomputation, the checkpoint kept until then, the slice's own activations
added there); the best few are rewritten and measured, the best of those
taken, then the next, until none saves enough.  ``"always"`` recomputes every candidate,
``"never"`` none.  Run it after the fusions (their kernels are the ones
re-emitted), before PlanMemory.

Before (block 8's masks alive from the forward to the backward)::

    lv53 = R.call_tir(cls.conv2d_requant, (lv51, w, b, c0, c1), R.Tensor((1, 72, 8, 8), "int8"))
    lv28 = R.call_tir(cls.clamp_mask, (lv53,), R.Tensor((576,), "uint8"))
    ...                                  # later layers, the loss, their backward
    lv20 = R.call_tir(cls.depthwise_block_backward, (lv227, lv30, w2, ..., lv28, ...), ...)

After (``lv51``, block 8's input, is the checkpoint)::

    lv53 = R.call_tir(cls.conv2d_requant, (lv51, w, b, c0, c1), R.Tensor((1, 72, 8, 8), "int8"))
    ...
    lv500 = R.call_tir(cls.conv2d_requant, (lv51, w, b, c0, c1), R.Tensor((1, 72, 8, 8), "int8"))
    lv501 = R.call_tir(cls.clamp_mask, (lv500,), R.Tensor((576,), "uint8"))
    ...
    lv20 = R.call_tir(cls.depthwise_block_backward, (lv227, lv30, w2, ..., lv501, ...), ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax

from tvm_tinytrain.errors import TinyTrainError

from ._buffers import IN_PLACE_OPS, OVERWRITING_OPS, analyze, in_place_fields, storage_buffers, type_bytes
from ._fusion import reader_positions, reemit
from ._ir import decode
from ._row_pipeline import ROW_OPS, row_pipelines
from .config import option, policy_targets
from .plan_memory import live_floor, live_floor_timeline

# Forward kernels that are pure functions of their operands: what a recomputed slice may re-emit.
RECOMPUTABLE_OPS = ("conv2d_requant", "depthwise_in_place", "pointwise_in_place", "expand_depthwise", "add_int8", "clamp_mask")
# Segments rewritten and measured per step, the best estimated first: the estimate misses in-place reuse, a trial
# costs a rewrite and a liveness analysis.
TRIALS = 2
LOSS_OP = "softmax_cross_entropy"


@dataclass
class Segment:
    """Masks ``masks`` (vars of forward ``clamp_mask`` bindings) made again from ``checkpoint`` by the forward
    bindings ``slice`` (indices, in order), re-emitted before binding ``at``."""

    checkpoint: relax.Var
    masks: list[relax.Var]
    slice: list[int]
    at: int
    net_bytes: int  # mask bytes no longer held, less the checkpoint's when the backward would not keep it anyway
    transient_bytes: int  # the most bytes the re-emitted slice has alive at once (its masks included)


def segments(mod: tvm.IRModule, name: str) -> list[Segment]:
    """The candidate segments of function ``name``, one per checkpoint, the most mask bytes net of it first."""
    func = mod[name]
    bindings = list(func.body.blocks[0].bindings)
    calls = [decode(mod, b) for b in bindings]
    loss = next((i for i, c in enumerate(calls) if c is not None and c.op == LOSS_OP), None)
    if loss is None:
        return []
    readers = reader_positions(func)
    producer = {b.var: i for i, b in enumerate(bindings[:loss])}
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else 1
    params = set(func.params[num_input:])
    held = [bindings[i].var for i in range(loss) if calls[i] is not None and calls[i].op == "clamp_mask"
            and min(readers.get(bindings[i].var, [loss])) > loss]
    if not held:
        return []
    # activations the backward reads anyway: free checkpoints, and where a segment stops
    kept = {b.var for b in bindings[:loss] if any(r > loss for r in readers.get(b.var, []))}
    updated_at = _first_updates(bindings, calls, loss)

    def closure(mask: relax.Var, checkpoint: relax.Var) -> set[int] | None:
        """The forward bindings that make ``mask`` from ``checkpoint`` alone, or None where it takes anything else."""
        need, todo = set(), [mask]
        while todo:
            var = todo.pop()
            i = producer.get(var)
            if i is None or calls[i] is None or calls[i].op not in RECOMPUTABLE_OPS or (var in kept and not var.same_as(mask)):
                return None
            if i in need:
                continue
            need.add(i)
            for arg in calls[i].args:
                if isinstance(arg, relax.Var) and not arg.same_as(checkpoint) and arg not in params:
                    todo.append(arg)
        return need

    # a streamed layer's output is a ring of rows, but for its pipeline's last layer
    last_rows = {pipe.stages[-1].binding for pipe in row_pipelines(mod, func)}
    found = []
    for checkpoint in {b.var for i, b in enumerate(bindings[:loss]) if _is_activation(b.var) and calls[i] is not None
                       and (calls[i].op not in ROW_OPS or i in last_rows)}:
        masks, need = [], set()
        for mask in held:
            if producer[mask] > producer[checkpoint] and (part := closure(mask, checkpoint)) is not None:
                masks.append(mask)
                need |= part
        if not masks:
            continue
        at = min(r for m in masks for r in readers[m])
        reads = {a for i in need for a in calls[i].args if isinstance(a, relax.Var) and a in params}
        if any(updated_at.get(p, at) < at for p in reads):
            continue  # a parameter the slice reads would already be updated there
        cost = 0 if checkpoint in kept else type_bytes(checkpoint.ty)
        order = sorted(need)
        found.append(Segment(checkpoint, masks, order, at, sum(type_bytes(m.ty) for m in masks) - cost,
                             _slice_peak([bindings[i].var for i in order], [calls[i] for i in order])))
    return sorted(found, key=lambda s: (-s.net_bytes, producer[s.checkpoint]))


def _slice_peak(outs: list[relax.Var], calls: list) -> int:
    """The most bytes of its own outputs a straight-line slice has alive at once: each until its last reader in the
    slice (a mask, which nothing there reads, to the end), an overwriting kernel's output over an operand dying there."""
    last = {v: max((j for j, c in enumerate(calls) if any(v.same_as(a) for a in c.args)), default=len(outs)) for v in outs}
    peak = 0
    for i, (out, call) in enumerate(zip(outs, calls)):
        live = sum(type_bytes(v.ty) for v in outs[:i] if last[v] >= i) + type_bytes(out.ty)
        dying = [type_bytes(v.ty) for v in outs[:i] if last[v] == i and any(v.same_as(a) for a in call.args)]
        if call.op in OVERWRITING_OPS and dying:
            live -= min(max(dying), type_bytes(out.ty))
        peak = max(peak, live)
    return peak


def estimated_peak(buffers: list, seg: Segment, by_var: dict) -> int:
    """The live-bytes peak with ``seg`` recomputed, estimated from the function's ``buffers`` (``analyze``; ``by_var``
    the one each binding writes): its masks gone until the recomputation, its checkpoint kept until then, the slice
    re-emitted beside what is alive across binding ``seg.at``."""
    live = live_floor_timeline(buffers)
    masks = [by_var[m] for m in seg.masks]
    for m in masks:
        for t in range(m.start, seg.at):
            live[t] -= m.size
    x = by_var.get(seg.checkpoint)
    held = x is not None and x.end < seg.at
    if held:
        for t in range(x.end + 1, seg.at):
            live[t] = live.get(t, 0) + x.size
    across = sum(b.size for b in storage_buffers(buffers) if b.start < seg.at <= b.end) - sum(m.size for m in masks)
    return max(*live.values(), across + (x.size if held else 0) + seg.transient_bytes)


def _is_activation(var: relax.Var) -> bool:
    return isinstance(var.ty, relax.TensorType) and str(var.ty.dtype) == "int8" and len(var.ty.shape) == 4


def _first_updates(bindings: list, calls: list, loss: int) -> dict[relax.Var, int]:
    """Each parameter the backward updates in place -> the index of its first update."""
    first: dict[relax.Var, int] = {}
    for i in range(loss, len(bindings)):
        call = calls[i]
        if call is None:
            continue
        args = [0] if call.op in IN_PLACE_OPS else []
        for arg in (*args, *in_place_fields(call).values()):
            if isinstance(call.args[arg], relax.Var):
                first.setdefault(call.args[arg], i)
    return first


def _substitute(expr, vmap: dict):
    """``expr`` (a binding's value) with the vars of ``vmap`` replaced."""
    if not any(v in vmap for v in relax.analysis.free_vars(expr)):
        return expr
    if isinstance(expr, relax.Var):
        return vmap.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_substitute(f, vmap) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(_substitute(expr.tuple_value, vmap), expr.index)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [_substitute(a, vmap) for a in expr.args], expr.attrs, expr.ty_args)
    raise TinyTrainError(f"CheckpointMasks: cannot rewrite a binding of {type(expr).__name__} that reads a recomputed mask")


def recompute(mod: tvm.IRModule, name: str, seg: Segment) -> tvm.IRModule:
    """``mod`` with ``seg``'s masks made again from its checkpoint before binding ``seg.at`` of function ``name``."""
    bindings = list(mod[name].body.blocks[0].bindings)
    at, masks = bindings[seg.at], set(seg.masks)
    remap: dict = {}

    def emit(bb, binding) -> bool:
        if binding.var in masks:
            return True  # the forward's mask: made again below
        if binding.same_as(at):
            made = {}
            for i in seg.slice:
                old = bindings[i]
                made[old.var] = bb.emit(_substitute(old.value, made))
            remap.update({m: made[m] for m in seg.masks})
        if not remap:
            return False
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(_substitute(binding.value, remap))))
        return True

    return reemit(mod, name, emit)


@tvm.transform.module_pass(opt_level=0, name="CheckpointMasks")
class CheckpointMasks:
    """Recompute clamp masks held from the forward to the backward from a checkpointed activation, per options
    ``checkpoint_masks`` ("at-peak", "always", "never") and ``recompute_min_saving`` (bytes of peak an "at-peak"
    recomputation must save); run after the fusions, before PlanMemory."""

    def __init__(self, policy: str | None = None, min_saving: int | None = None):
        self.policy, self.min_saving = policy, min_saving

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        policy, names = policy_targets(mod, "CheckpointMasks", "checkpoint_masks", self.policy)
        if not names:
            return mod
        if policy == "always":
            for name in names:
                while found := segments(mod, name):
                    mod = recompute(mod, name, found[0])
            return mod
        min_saving = int(option("recompute_min_saving", self.min_saving))
        analyses = {name: analyze(mod, mod[name]) for name in names}
        peaks = {name: live_floor(sb.buffers) for name, sb in analyses.items()}
        while True:  # lower the function that peaks highest (the step functions share the C arena), while that pays
            name = max(names, key=peaks.__getitem__)
            sb = analyses[name]
            written = {b.start: b for b in sb.buffers if b.kind != "workspace" and b.start >= 0}
            by_var = {b.var: written[i] for i, b in enumerate(sb.bindings) if i in written}
            paying = sorted((seg for seg in segments(mod, name) if seg.net_bytes > 0), key=lambda seg: estimated_peak(sb.buffers, seg, by_var))
            trials = []
            for seg in paying[:TRIALS]:
                trial = recompute(mod, name, seg)
                trial_sb = analyze(trial, trial[name])
                trials.append((live_floor(trial_sb.buffers), trial, trial_sb))
            peak, best, best_sb = min(trials, key=lambda t: t[0], default=(peaks[name], mod, sb))
            if peaks[name] - peak < min_saving:
                return mod
            mod, peaks[name], analyses[name] = best, peak, best_sb
