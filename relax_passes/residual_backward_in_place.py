"""ResidualBackwardInPlace: a residual block's input gradient written over its output gradient, a band of rows at a time.

Going backwards through a residual inverted block ``y = x + project(depthwise(expand(x)))``, the input
gradient is the output gradient (the skip path) plus the branch's input gradient.  After
FuseDepthwiseBackward the branch is one kernel, but its result is a second float32 tensor of the block's
width beside the output gradient, which the skip path's ``add_f32`` reads afterwards: two such tensors at
once (e.g. Proxyless ``paper-148kb``'s blocks[6], two of 16 KB, its step's peak).  The branch's input
gradient at row ``y`` reads the output gradient ``g`` only within the depthwise conv's reach of ``pad``
rows around ``y``, so the kernel ``residual_block_backward`` (``tvm_tinytrain/ops/tir_backward.py``) does
the block a band of rows at a time, top to bottom, and writes each band's sum over ``g``, keeping a copy of
the ``pad`` rows above the next band: one tensor of the block's width, plus a band and ``pad`` rows of it.
The projection's front over each band's ``pad`` rows either side is summed again by the next band (rows
times ``(band + 2 * pad) / band``).  Same bits as the kernels it replaces.

It applies where FuseDepthwiseBackward's kernel has the projection's front, the expansion's input gradient,
a frozen expansion (nor masks recomputed from its input), stride 1 and the block's width on both sides, and
where its input gradient's only reader is ``add_f32`` with the kernel's output gradient; the planner then
lets the sum take the output gradient's storage when nothing reads it later (``OVERWRITING_OPS``).  Option
``residual_backward_in_place``: ``at-peak`` (the default) rewrites a block only in the function whose peak
is the module's highest (``train_step`` and ``infer`` share the C arena) and while that lowers its peak by
``recompute_min_saving`` bytes, with the widest band that lowers it as far as the narrowest does (fewer rows
summed twice; a band's kernel keeps its buffers within codegen's workspace limit of one kernel); ``always``
rewrites every such block with its narrowest band; ``never`` none.  Run it after the fusions and
DepthwiseInPlace.

Before::

    lv23 = R.call_tir(cls.depthwise_block_backward, (lv253, lv23m, w_proj, ..., lr, b1, b2),
                      [R.Tensor((1, 16, 16, 16), "float32"), R.Tensor((48,), "int32"), R.Tensor((48,), "int32")])
    lv265 = lv23[0]
    lv266 = R.call_tir(cls.add_f32, (lv253, lv265), R.Tensor((1, 16, 16, 16), "float32"))

After (``tinytrain.band`` rows at a time)::

    lv23 = R.call_tir(cls.residual_block_backward, (lv253, lv23m, w_proj, ..., lr, b1, b2),
                      [R.Tensor((1, 16, 16, 16), "float32"), R.Tensor((48,), "int32"), R.Tensor((48,), "int32")])
    lv265 = lv23[0]
    lv266 = lv265
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from tvm_tinytrain.ops.tir_backward import residual_block_backward
from tvm_tinytrain.relax_build import kernel_attrs

from ._buffers import kernel_workspace_bytes
from ._fusion import reader_counts, reemit
from ._ir import decode
from .config import option, policy_targets
from .fuse_depthwise_backward import OP as FUSED_OP
from .plan_memory import function_live_floor

OP = "residual_block_backward"


def _blocks(mod: tvm.IRModule, name: str) -> dict:
    """Fused block backward var -> (its form, its input gradient's var, the ``add_f32`` that adds that to the output
    gradient the kernel reads) for each block this pass can rewrite in function ``name``."""
    func = mod[name]
    bindings = list(func.body.blocks[0].bindings)
    calls = [decode(mod, b) for b in bindings]
    readers = reader_counts(func)
    fields = {(b.value.tuple_value, b.value.index): b.var for b in bindings if isinstance(b.value, relax.TupleGetItem)}
    adds = {}
    for c in calls:
        if c is not None and c.op == "add_f32":
            for k in (0, 1):
                adds.setdefault(c.args[k], []).append((c, c.args[1 - k]))
    found = {}
    for c in calls:
        if c is None or c.op != FUSED_OP:
            continue
        form = json.loads(c.attrs["form"])
        if (form["projection"] != form["in_channels"] or not form["input_grad"] or form["trained_x_zero"] is not None
                or form["recompute"] is not None or form["stride"] != 1 or (form["h"], form["w"]) != (form["ho"], form["wo"])):
            continue
        g_x = fields.get((c.var, 0))
        if g_x is None or readers.get(g_x) != 1 or len(adds.get(g_x, [])) != 1:
            continue
        add, other = adds[g_x][0]
        if other.same_as(c.args[0]):
            found[c.var] = (form, g_x, add)
    return found


def _kernel(form: dict, band: int, node: str) -> tvm.tirx.PrimFunc:
    prim = residual_block_backward(form["channels"], form["in_channels"], form["h"], form["w"], form["k"], band, form["masked_front"],
                                   form["update_biases"])
    return prim.with_attrs({**kernel_attrs(OP, node), "tinytrain.band": band})


def bands(form: dict) -> list[int]:
    """The bands of rows the kernel can take for a block of this form, narrowest first: each divides the rows, covers
    the depthwise conv's reach and keeps the kernel's buffers within one kernel's workspace limit, and none is all of
    the rows (that would keep the whole sum beside ``g``)."""
    from tvm_tinytrain.codegen.kernels import MAX_WORKSPACE_BYTES  # here: the code generator imports the passes

    pad = (form["k"] - 1) // 2
    return [b for b in range(max(pad, 1), form["h"])
            if form["h"] % b == 0 and kernel_workspace_bytes(_kernel(form, b, ""), OP) <= MAX_WORKSPACE_BYTES]


def rewrite(mod: tvm.IRModule, name: str, block: relax.Var, band: int) -> tvm.IRModule:
    """``mod`` with the fused block backward bound to ``block`` in function ``name`` done in place, ``band`` rows at a
    time (a block :func:`_blocks` finds)."""
    form, g_x, add = _blocks(mod, name)[block]

    def emit(bb, binding) -> bool:
        if binding.var.same_as(add.var):  # the sum is the kernel's first output now
            bb.emit_normalized(relax.VarBinding(add.var, g_x))
            return True
        if not binding.var.same_as(block):
            return False
        gv = bb.add_func(_kernel(form, band, decode(mod, binding).node), OP)
        value = binding.value
        bb.emit_normalized(relax.VarBinding(block, bb.normalize(relax.Call(value.op, [gv, *value.args[1:]], value.attrs, value.ty_args))))
        return True

    return reemit(mod, name, emit)


@tvm.transform.module_pass(opt_level=0, name="ResidualBackwardInPlace")
class ResidualBackwardInPlace:
    """Do a residual block's fused backward and its skip path's add in place over the block's output gradient, a
    band of rows at a time, per options ``residual_backward_in_place`` ("at-peak", "always", "never") and
    ``recompute_min_saving`` (bytes of peak an "at-peak" rewrite must save); run after the fusions, before PlanMemory."""

    def __init__(self, policy: str | None = None, min_saving: int | None = None):
        self.policy, self.min_saving = policy, min_saving

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        policy, names = policy_targets(mod, "ResidualBackwardInPlace", "residual_backward_in_place", self.policy)
        if policy == "always":
            for name in names:
                for block, (form, _, _) in _blocks(mod, name).items():
                    if choices := bands(form):
                        mod = rewrite(mod, name, block, choices[0])
            return mod
        min_saving = int(option("recompute_min_saving", self.min_saving))
        while names:  # lower the function that peaks highest, while that saves enough
            peaks = {name: function_live_floor(mod, name) for name in names}
            name = max(names, key=peaks.__getitem__)
            trials = []
            for block, (form, _, _) in _blocks(mod, name).items():
                if choices := bands(form):
                    trial = rewrite(mod, name, block, choices[0])
                    trials.append((function_live_floor(trial, name), block, form, trial))
            if not trials or peaks[name] - min(t[0] for t in trials) < min_saving:
                return mod
            floor, block, form, narrowest = min(trials, key=lambda t: t[0])
            for band in reversed(bands(form)[1:]):  # the widest band that leaves the same peak: fewer rows summed twice
                trial = rewrite(mod, name, block, band)
                if function_live_floor(trial, name) <= floor:
                    mod = trial
                    break
            else:
                mod = narrowest
        return mod
