"""FuseConvRequant: one kernel per conv (or int8 classifier) and its requantization.

``conv2d_acc`` writes an int32 accumulator tensor that only ``requantize``
reads: four bytes per output element that exist just to be narrowed to one.
This pass replaces each such pair by one ``conv2d_requant`` PrimFunc whose
requantization the compact schedule (``tvm_tinytrain/ops/schedule.py``)
computes inside the conv's output-pixel loop, so the accumulator shrinks to
a single int32 during lowering and the int32 tensor disappears from the
memory plan.
The integer results are unchanged (same TE expressions, same order).

Before::

    lv = R.call_tir(cls.conv2d_acc, (x, w), R.Tensor((1, 32, 64, 64), "int32"))
    lv1 = R.call_tir(cls.requantize, (lv, b, c0, c1), R.Tensor((1, 32, 64, 64), "int8"))

After::

    lv1 = R.call_tir(cls.conv2d_requant, (x, w, b, c0, c1), R.Tensor((1, 32, 64, 64), "int8"))
"""

from __future__ import annotations

import tvm
from tvm import relax, te

from tvm_tinytrain.ops import te_backward, te_kernels
from tvm_tinytrain.ops.schedule import compact_schedule
from tvm_tinytrain.relax_build import kernel_attrs

from ._ir import builder_without, decode, shape_of


def _accumulator(acc_call, args: list[te.Tensor]) -> te.Tensor:
    """The TE of an accumulating kernel call, including a weight merged from a flash original and a RAM slice."""
    a = acc_call.attrs
    if acc_call.op == "linear_acc":
        return te_kernels.linear_acc(*args, a["x_zero"])
    x, w = args[0], args[1]
    if len(args) == 3:  # SparseUpdate's partially trained weight: (x, frozen, trained slice)
        w = te_backward.merge_channels(args[1], args[2], 0 if a["groups"] > 1 else 1, tuple(a["merged_channels"]))
    return te_kernels.conv2d_acc(x, w, a["x_zero"], a["stride"], a["groups"])


def fused_conv_requant(acc_call, rq_call) -> tvm.tirx.PrimFunc:
    """One PrimFunc: the accumulation then requantize, scheduled so the accumulator is a scalar."""
    acc_args = _placeholders(acc_call.args)
    rq_args = _placeholders(rq_call.args[1:], len(acc_args))
    r = rq_call.attrs
    y = te_kernels.requantize(_accumulator(acc_call, acc_args), *rq_args, r["y_zero"], r["qmin"], r["qmax"])
    return compact_schedule(te.create_prim_func([*acc_args, *rq_args, y])).without_attr("global_symbol")


@tvm.transform.module_pass(opt_level=0, name="FuseConvRequant")
class FuseConvRequant:
    """Fuse every ``conv2d_acc``/``linear_acc`` whose only reader is a ``requantize`` into one kernel."""

    def __init__(self, func_names: tuple[str, ...] | None = None):
        self.func_names = func_names

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        names = self.func_names or tuple(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function))
        mod = relax.transform.CanonicalizeBindings()(mod)  # an alias between the conv and its requantize would hide the pair
        for name in names:
            mod = self._fuse_function(mod, name)
        return relax.transform.DeadCodeElimination(list(names))(mod)

    @staticmethod
    def _fuse_function(mod, name):
        func = mod[name]
        bindings = list(func.body.blocks[0].bindings)
        readers: dict[relax.Var, int] = {}
        for b in bindings:
            for v in relax.analysis.free_vars(b.value):
                readers[v] = readers.get(v, 0) + 1
        for v in relax.analysis.free_vars(func.body.body):
            readers[v] = readers.get(v, 0) + 1
        calls = [decode(mod, b) for b in bindings]
        single = {c.var: c for c in calls if c is not None and c.op in ("conv2d_acc", "linear_acc") and readers.get(c.var) == 1}
        acc_calls = {c.args[0]: single[c.args[0]] for c in calls if c is not None and c.op == "requantize" and c.args[0] in single}
        bb = builder_without(mod, name)
        with bb.function(name, list(func.params), attrs=dict(func.attrs.items()) if func.attrs else None, pure=func.is_pure):
            with bb.dataflow():
                for b, call in zip(bindings, calls):
                    if call is not None and call.var in acc_calls:
                        continue
                    if call is not None and call.op == "requantize" and call.args[0] in acc_calls:
                        acc = acc_calls[call.args[0]]
                        prim = fused_conv_requant(acc, call)
                        op = "conv2d_requant" if acc.op == "conv2d_acc" else "linear_requant"
                        prim = prim.with_attrs(kernel_attrs(op, call.node, **{k: v for k, v in {**acc.attrs, **call.attrs}.items() if k != "node"}))
                        gv = bb.add_func(prim, op)
                        out = relax.call_tir(gv, relax.Tuple(acc.args + call.args[1:]), call.var.ty)
                        bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(out)))
                        continue
                    bb.emit_normalized(b)
            bb.emit_func_output(func.body.body)
        return bb.get()


def _placeholders(args, first: int = 0) -> list[te.Tensor]:
    return [te.placeholder(shape_of(a), str(a.ty.dtype), f"arg{first + i}") for i, a in enumerate(args)]
