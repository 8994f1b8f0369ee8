"""Small helpers the passes share for reading and rebuilding tinytrain's Relax graphs.

Every kernel call is ``R.call_tir(gv, args, out)`` whose PrimFunc carries
``tinytrain.*`` attributes (see ``tvm_tinytrain.relax_build.kernel_attrs``);
these helpers turn a binding back into ``(op, attrs, args)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import relax

from tvm_tinytrain.errors import TinyTrainError

CALL_TIR = tvm.ir.Op.get("relax.call_tir")


@dataclass
class KernelCall:
    """One ``call_tir`` binding, decoded."""

    var: relax.Var
    op: str
    attrs: dict
    args: list
    gvar: relax.GlobalVar

    @property
    def node(self) -> str:
        return self.attrs.get("node", "")


def _py(value):
    """FFI attribute values as plain Python (ints, floats, strings, lists)."""
    if isinstance(value, (bool, int, float, str)):
        return type(value)(value) if not isinstance(value, str) else str(value)
    if isinstance(value, tvm.tirx.IntImm):
        return int(value)
    if isinstance(value, tvm.tirx.FloatImm):
        return float(value)
    if isinstance(value, (list, tuple, tvm_ffi.Array)):
        return [_py(v) for v in value]
    return str(value)


def decode(mod: tvm.IRModule, binding) -> KernelCall | None:
    """The binding as a :class:`KernelCall`, or None when it is not a tinytrain kernel call."""
    value = binding.value
    if not (isinstance(value, relax.Call) and value.op.same_as(CALL_TIR)):
        return None
    gvar = value.args[0]
    func = mod[gvar]
    attrs = func.attrs or {}
    if "tinytrain.op" not in attrs:
        return None
    # A PrimFunc attribute (StreamInputRows' band kernel) is not a static value of the op.
    decoded = {k[len("tinytrain."):]: _py(v) for k, v in attrs.items() if k.startswith("tinytrain.") and not isinstance(v, tvm.tirx.PrimFunc)}
    return KernelCall(binding.var, decoded.pop("op"), decoded, list(value.args[1].fields), gvar)


def get_function(mod: tvm.IRModule, name: str, pass_name: str) -> relax.Function:
    """Function ``name`` of ``mod`` for pass ``pass_name`` to rewrite: a Relax function of one dataflow block."""
    if name not in [gv.name_hint for gv in mod.get_global_vars()] or not isinstance(mod[name], relax.Function):
        raise TinyTrainError(f"{pass_name}: the module has no Relax function {name!r}")
    dataflow_bindings(mod[name], f"{pass_name} ({name!r})")
    return mod[name]


def dataflow_bindings(func: relax.Function, pass_name: str) -> list:
    """The bindings of a function made of one dataflow block (the shape our builder emits)."""
    blocks = func.body.blocks
    if len(blocks) != 1 or not isinstance(blocks[0], relax.DataflowBlock):
        raise TinyTrainError(f"{pass_name}: expected a function with exactly one dataflow block, found {len(blocks)} block(s)")
    return list(blocks[0].bindings)


def tensor_type(var) -> relax.TensorType:
    return var.ty


def shape_of(var) -> tuple[int, ...]:
    return tuple(int(d) for d in var.ty.shape)


def dtype_of(var) -> str:
    return str(var.ty.dtype)


def with_function(mod: tvm.IRModule, name: str, func) -> tvm.IRModule:
    """A new module with ``name`` bound to ``func``; passes must not mutate their input module."""
    funcs = {gv: f for gv, f in mod.functions.items() if gv.name_hint != name}
    funcs[mod.get_global_var(name) if name in [g.name_hint for g in mod.get_global_vars()] else relax.GlobalVar(name)] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)


def builder_without(mod: tvm.IRModule, *names: str) -> relax.BlockBuilder:
    """A BlockBuilder over ``mod`` minus ``names``, so functions can be re-emitted under the same name."""
    funcs = {gv: f for gv, f in mod.functions.items() if gv.name_hint not in names}
    return relax.BlockBuilder(tvm.IRModule(funcs, attrs=mod.attrs))
