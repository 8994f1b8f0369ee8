"""FuseWeightUpdate: compute each int8 weight's gradient and apply its SGD step in the same loop, in place.

After ReorderUpdates a weight's update follows its gradient at once, but the
float32 gradient tensor still exists whole between the two kernels: four
bytes per trained weight element, the largest buffer of many sparse steps
(e.g. 144 KB for a 192x192 pointwise conv).  Each gradient element is only
needed for the update of the same weight element, so this pass replaces
every ``conv2d_weight_grad`` whose only reader is an ``sgd_update_int8``
with one ``conv2d_weight_grad_sgd`` kernel: the compact schedule turns the
gradient into one float32 register per element and the kernel writes the
new weight over the old one (argument 0, like the SGD kernels).  The float
operations and their order are unchanged, so the new weights are the same
bits.

Run it after ReorderUpdates (which placed the update after every reader of
the old weight, e.g. the input-gradient kernel) and after any
AccumulateGradients (which needs the separate gradient).  A pair with other
work between them (updates after the whole backward) is left alone: there
the fused kernel would keep the gradient's inputs alive until the update.

Before::

    g_w = R.call_tir(cls.conv2d_weight_grad, (x_sel, g_acc, scale), R.Tensor((192, 192, 1, 1), "float32"))
    w_new = R.call_tir(cls.sgd_update_int8, (w, g_w, lr), R.Tensor((192, 192, 1, 1), "int8"))

After::

    w_new = R.call_tir(cls.conv2d_weight_grad_sgd, (w, x_sel, g_acc, scale, lr), R.Tensor((192, 192, 1, 1), "int8"))
"""

from __future__ import annotations

import tvm
from tvm import relax, te

from tvm_tinytrain.ops import te_backward
from tvm_tinytrain.ops.schedule import compact_schedule
from tvm_tinytrain.relax_build import kernel_attrs

from ._buffers import IN_PLACE_OPS, type_bytes
from ._fusion import fuse_pairs, placeholders, relax_function_names
from ._ir import KernelCall

FUSED_OP = "conv2d_weight_grad_sgd"


# What may run between a gradient and its update for the fusion to pay: kernels that must read the old weight
# first, other updates, and aliases (no kernel).  Further apart (e.g. updates after the whole backward, the
# baseline without ReorderUpdates), computing the gradient at the update would keep its inputs alive longer.
_BETWEEN = ("conv2d_input_grad", *IN_PLACE_OPS)


def _pairs(calls, readers) -> dict:
    """sgd_update_int8 var -> the weight-gradient kernel it alone reads, when fusing them lowers the memory in between.

    Only kernels of ``_BETWEEN`` may separate them.  While e.g. the input gradient runs between them, the fused
    form keeps the gradient's saved input alive instead of the float32 gradient: fused only if that is smaller.
    """
    position = {c.var: i for i, c in enumerate(calls) if c is not None}
    grads = {c.var: c for c in calls if c is not None and c.op == "conv2d_weight_grad" and readers.get(c.var) == 1}
    pairs = {}
    for i, c in enumerate(calls):
        if c is not None and c.op == "sgd_update_int8" and c.args[1] in grads:
            grad = grads[c.args[1]]
            between = [b for b in calls[position[grad.var] + 1:i] if b is not None]
            if not all(b.op in _BETWEEN for b in between):
                continue
            kernels_between = any(b.op not in IN_PLACE_OPS for b in between)
            if not kernels_between or type_bytes(grad.args[0].ty) <= type_bytes(grad.var.ty):
                pairs[c.var] = grad
    return pairs


def _arguments(grad: KernelCall, sgd: KernelCall) -> list:
    w, _, lr = sgd.args
    return [w, *grad.args, lr]


def _fused_kernel(grad: KernelCall, sgd: KernelCall) -> tuple[tvm.tirx.PrimFunc, str]:
    a = grad.attrs
    depthwise_channels = tuple(a["channels"]) if a["depthwise"] else None
    args = placeholders(_arguments(grad, sgd))
    w_new = te_backward.conv2d_weight_grad_sgd(*args, a["x_zero"], a["stride"], a["kernel"], depthwise_channels)
    prim = compact_schedule(te.create_prim_func([*args, w_new])).without_attr("global_symbol")
    attrs = {k: v for k, v in a.items() if k not in ("node", "param")}
    return prim.with_attrs(kernel_attrs(FUSED_OP, grad.node, param=sgd.attrs["param"], **attrs)), FUSED_OP


@tvm.transform.module_pass(opt_level=0, name="FuseWeightUpdate")
class FuseWeightUpdate:
    """Fuse every int8 weight gradient into the SGD update that alone reads it (in place, no gradient tensor)."""

    def __init__(self, func_names: tuple[str, ...] | None = None):
        self.func_names = func_names

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        names = relax_function_names(mod, "FuseWeightUpdate", self.func_names or None)
        for name in names:
            mod = fuse_pairs(mod, name, _pairs, _fused_kernel, _arguments)
        return relax.transform.DeadCodeElimination(names)(mod)
