"""ReorderUpdates: update each parameter in place as soon as its gradient exists.

A conventional optimizer runs every update after the whole backward, so all
gradient buffers are alive together.  Here each SGD update is moved to the
earliest point where it is legal: after the kernel that computes its
gradient and after every other reader of the parameter's old value (the
update writes in place, so e.g. the input-gradient kernel that reads the old
weight must run first).  The gradient buffer then dies at once.  Everything
else keeps its relative order; the result is checked to be a valid
topological order of the data and in-place (anti-)dependencies.

With ``reorder=False`` (pass argument or ``pass_config``) the pass leaves the
function as it is, which is the baseline the paper compares with.

Before::

    g_w5 = R.call_tir(cls.conv2d_weight_grad, ...)
    g_x5 = R.call_tir(cls.conv2d_input_grad, (g_acc5, w5, ...))
    ... the rest of the backward ...
    w5_new = R.call_tir(cls.sgd_update_int8, (w5, g_w5, lr))

After::

    g_w5 = R.call_tir(cls.conv2d_weight_grad, ...)
    g_x5 = R.call_tir(cls.conv2d_input_grad, (g_acc5, w5, ...))
    w5_new = R.call_tir(cls.sgd_update_int8, (w5, g_w5, lr))
    ... the rest of the backward ...
"""

from __future__ import annotations

import heapq

import tvm
from tvm import relax

from tvm_tinytrain.errors import TinyTrainError

from ._buffers import IN_PLACE_OPS
from ._ir import decode, get_function, with_function
from .config import option


def dependencies(mod, bindings) -> list[set[int]]:
    """For each binding, the bindings that must run before it (data and in-place dependencies)."""
    defined: dict[relax.Var, int] = {}
    readers: dict[relax.Var, list[int]] = {}  # parameter -> bindings that read it
    deps: list[set[int]] = []
    for i, binding in enumerate(bindings):
        used = relax.analysis.free_vars(binding.value)
        deps.append({defined[v] for v in used if v in defined})
        for v in used:
            if v not in defined:
                readers.setdefault(v, []).append(i)
        defined[binding.var] = i
    for i, binding in enumerate(bindings):
        call = decode(mod, binding)
        if call is not None and call.op in IN_PLACE_OPS:
            param = call.args[0]
            deps[i] |= {j for j in readers.get(param, []) if j != i}
    return deps


def schedule(mod, bindings, prefer_updates: bool) -> list[int]:
    """List scheduling: original order, except ready updates go first when ``prefer_updates``."""
    deps = dependencies(mod, bindings)
    users: list[list[int]] = [[] for _ in bindings]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    is_update = [prefer_updates and (c := decode(mod, b)) is not None and c.op in IN_PLACE_OPS for b in bindings]
    ready = [(not is_update[i], i) for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (not is_update[u], u))
    if len(order) != len(bindings):
        raise TinyTrainError("ReorderUpdates: the dependencies have a cycle; the function is not a valid dataflow block")
    return order


@tvm.transform.module_pass(opt_level=0, name="ReorderUpdates")
class ReorderUpdates:
    """Move every SGD update right after its gradient (and the last read of the old parameter)."""

    def __init__(self, reorder: bool | None = None, func_name: str = "train_step"):
        self.reorder = reorder
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not option("reorder", self.reorder):
            return mod
        func = get_function(mod, self.func_name, "ReorderUpdates")
        block = func.body.blocks[0]
        bindings = list(block.bindings)
        order = schedule(mod, bindings, prefer_updates=True)
        new_block = relax.DataflowBlock([bindings[i] for i in order])
        body = relax.SeqExpr([new_block], func.body.body)
        new_func = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
        return with_function(mod, self.func_name, new_func)
