"""What the fusion passes share: fuse a producer kernel into its only reader, re-emitting the function.

By default a fused kernel takes the producer's arguments followed by the
consumer's minus its first (the producer's output); it binds the consumer's
var, so the rest of the function is unchanged.
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax, te

from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.ops import te_kernels
from tvm_tinytrain.ops.schedule import current_variant

from ._ir import KernelCall, builder_without, dataflow_bindings, decode, shape_of
from .config import option


def reader_positions(func: relax.Function) -> dict[relax.Var, list[int]]:
    """Each var's readers: binding indices in order, the function result counting as one past the last binding."""
    positions: dict[relax.Var, list[int]] = {}
    exprs = [b.value for b in func.body.blocks[0].bindings] + [func.body.body]
    for i, expr in enumerate(exprs):
        for v in relax.analysis.free_vars(expr):
            positions.setdefault(v, []).append(i)
    return positions


def reader_counts(func: relax.Function) -> dict[relax.Var, int]:
    """How many bindings (and the function result) read each var."""
    return {v: len(p) for v, p in reader_positions(func).items()}


def _producer_then_consumer(producer: KernelCall, consumer: KernelCall) -> list:
    return producer.args + consumer.args[1:]


def fuse_pairs(mod: tvm.IRModule, name: str,
               find_pairs: Callable[[list, dict], dict[relax.Var, KernelCall]],
               fused_kernel: Callable[[KernelCall, KernelCall], tuple[tvm.tirx.PrimFunc, str]],
               arguments: Callable[[KernelCall, KernelCall], list] = _producer_then_consumer) -> tvm.IRModule:
    """Re-emit function ``name`` with each (producer, consumer) pair ``find_pairs(calls, readers)`` returns
    (consumer var -> producer) replaced by one ``call_tir`` of ``fused_kernel(producer, consumer)`` = (PrimFunc, name)
    on ``arguments(producer, consumer)``."""
    func = mod[name]
    calls = [decode(mod, b) for b in func.body.blocks[0].bindings]
    pairs = find_pairs(calls, reader_counts(func))
    producers = {p.var for p in pairs.values()}
    consumers = {c.var: c for c in calls if c is not None and c.var in pairs}

    def emit(bb, binding) -> bool:
        if binding.var in producers:
            return True  # computed inside its reader's fused kernel
        if binding.var not in pairs:
            return False
        producer, call = pairs[binding.var], consumers[binding.var]
        prim, op = fused_kernel(producer, call)
        gv = bb.add_func(prim, op)
        value = relax.call_tir(gv, relax.Tuple(arguments(producer, call)), binding.var.ty)
        bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(value)))
        return True

    return reemit(mod, name, emit)


def reemit(mod: tvm.IRModule, name: str, emit: Callable[[relax.BlockBuilder, relax.Binding], bool]) -> tvm.IRModule:
    """Re-emit function ``name`` binding by binding: ``emit(bb, binding)`` emits a replacement (or nothing, to drop
    the binding) and returns True, or returns False to keep the binding as it is."""
    func = mod[name]
    bb = builder_without(mod, name)
    with bb.function(name, list(func.params), attrs=dict(func.attrs.items()) if func.attrs else None, pure=func.is_pure):
        with bb.dataflow():
            for binding in func.body.blocks[0].bindings:
                if not emit(bb, binding):
                    bb.emit_normalized(binding)
        bb.emit_func_output(func.body.body)
    return relax.transform.DeadCodeElimination([name])(bb.get())


def relax_function_names(mod: tvm.IRModule, pass_name: str | None = None, given=None) -> list[str]:
    """The module's Relax functions, or the names ``given`` (checked to be among them).  With ``pass_name`` (a pass
    about to rewrite them), each is checked to be one dataflow block, the shape the passes read and re-emit."""
    names = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
    if given is not None:
        if isinstance(given, str) or not all(isinstance(n, str) for n in given):
            raise TinyTrainError(f"{pass_name}: func_names must be a list of function names, got {given!r}")
        missing = [n for n in given if n not in names]
        if missing:
            raise TinyTrainError(f"{pass_name}: the module has no Relax function {missing[0]!r}")
        names = list(given)
    if pass_name is not None:
        for name in names:
            dataflow_bindings(mod[name], f"{pass_name} ({name!r})")
    return names


def placeholders(args, first: int = 0) -> list[te.Tensor]:
    """TE placeholders for a kernel call's Relax arguments (to rebuild its TE with another stage around it)."""
    return [te.placeholder(shape_of(a), str(a.ty.dtype), f"arg{first + i}") for i, a in enumerate(args)]


def conv_quant(call) -> dict:
    """A conv call's quantization attributes, as the TIR kernels take them: ``x_zero``, ``y_zero``, ``qmin``, ``qmax``."""
    return {key: call.attrs[key] for key in ("x_zero", "y_zero", "qmin", "qmax")}


class PlanePass:
    """The frame of a module pass that rewrites each Relax function with the ``max_plane_bytes`` option.

    A subclass (decorated with ``tvm.transform.module_pass``) gives ``_rewrite(mod, name, max_plane)``.
    """

    def __init__(self, max_plane_bytes: int | None = None):
        self.max_plane_bytes = max_plane_bytes

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        max_plane = int(option("max_plane_bytes", self.max_plane_bytes))
        for name in relax_function_names(mod, type(self).__name__):
            mod = self._rewrite(mod, name, max_plane)
        return mod


def wide_shift(shift) -> bool:
    """Whether the optimized kernels may requantize with the cheaper wide-shift steps (te_kernels.requant_preclamp)."""
    return (current_variant() == "optimized" and isinstance(shift, tvm.ir.Constant)
            and int(shift.value.numpy().min()) >= te_kernels.WIDE_SHIFT)
