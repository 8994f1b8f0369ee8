"""FuseConvRequant: one kernel per conv (or int8 classifier) and its requantization.

``conv2d_acc`` writes an int32 accumulator tensor that only ``requantize``
reads: four bytes per output element that exist just to be narrowed to one.
This pass replaces each such pair by one ``conv2d_requant`` PrimFunc whose
requantization TVM schedules inside the conv's output-pixel loop
(``reverse_compute_at``), so the accumulator shrinks to a single int32
during lowering and the int32 tensor disappears from the memory plan.
The integer results are unchanged (same TE expressions, same order).

Before::

    lv = R.call_tir(cls.conv2d_acc, (x, w), R.Tensor((1, 32, 64, 64), "int32"))
    lv1 = R.call_tir(cls.requantize, (lv, b, c0, c1), R.Tensor((1, 32, 64, 64), "int8"))

After::

    lv1 = R.call_tir(cls.conv2d_requant, (x, w, b, c0, c1), R.Tensor((1, 32, 64, 64), "int8"))
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te

from tvm_tinytrain.ops import te_kernels
from tvm_tinytrain.relax_build import kernel_attrs

from ._ir import builder_without, decode, shape_of


def fused_conv_requant(x: te.Tensor, w: te.Tensor, bias: te.Tensor, mult: te.Tensor, shift: te.Tensor, acc_attrs: dict, rq_attrs: dict):
    """TE of conv (or linear) accumulation followed by requantize, as one PrimFunc with a scalar accumulator."""
    if len(x.shape) == 4:
        acc = te_kernels.conv2d_acc(x, w, acc_attrs["x_zero"], acc_attrs["stride"], acc_attrs["groups"])
    else:
        acc = te_kernels.linear_acc(x, w, acc_attrs["x_zero"])
    y = te_kernels.requantize(acc, bias, mult, shift, rq_attrs["y_zero"], rq_attrs["qmin"], rq_attrs["qmax"])
    func = te.create_prim_func([x, w, bias, mult, shift, y])
    sch = s_tir.Schedule(func)
    acc_block = sch.get_sblock("acc")
    spatial = len(y.shape)
    sch.reverse_compute_at(sch.get_sblock("requant"), sch.get_loops(acc_block)[spatial - 1])
    return sch.mod["main"].without_attr("global_symbol")


@tvm.transform.module_pass(opt_level=0, name="FuseConvRequant")
class FuseConvRequant:
    """Fuse every ``conv2d_acc``/``linear_acc`` whose only reader is a ``requantize`` into one kernel."""

    def __init__(self, func_names: tuple[str, ...] | None = None):
        self.func_names = func_names

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        names = self.func_names or tuple(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function))
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
        acc_calls = {c.var: c for c in calls if c is not None and c.op in ("conv2d_acc", "linear_acc") and readers.get(c.var) == 1}
        bb = builder_without(mod, name)
        with bb.function(name, list(func.params), attrs=dict(func.attrs.items()) if func.attrs else None, pure=func.is_pure):
            with bb.dataflow():
                for b, call in zip(bindings, calls):
                    if call is not None and call.var in acc_calls:
                        continue
                    if call is not None and call.op == "requantize" and call.args[0] in acc_calls:
                        acc = acc_calls[call.args[0]]
                        prim = fused_conv_requant(*_placeholders(acc.args + call.args[1:]), acc.attrs, call.attrs)
                        op = "conv2d_requant" if acc.op == "conv2d_acc" else "linear_requant"
                        prim = prim.with_attrs(kernel_attrs(op, call.node, **{k: v for k, v in {**acc.attrs, **call.attrs}.items() if k != "node"}))
                        gv = bb.add_func(prim, op)
                        out = relax.call_tir(gv, relax.Tuple(acc.args + call.args[1:]), call.var.ty)
                        bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(out)))
                        continue
                    bb.emit_normalized(b)
            bb.emit_func_output(func.body.body)
        return bb.get()


def _placeholders(args) -> list[te.Tensor]:
    return [te.placeholder(shape_of(a), str(a.ty.dtype), f"arg{i}") for i, a in enumerate(args)]
