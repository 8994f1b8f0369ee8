"""What the fusion passes share: fuse a producer kernel into its only reader, re-emitting the function.

By default a fused kernel takes the producer's arguments followed by the
consumer's minus its first (the producer's output); it binds the consumer's
var, so the rest of the function is unchanged.
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax, te

from tvm_tinytrain.ops import te_kernels
from tvm_tinytrain.ops.schedule import current_variant

from ._ir import KernelCall, builder_without, decode, shape_of


def reader_counts(func: relax.Function) -> dict[relax.Var, int]:
    """How many bindings (and the function result) read each var."""
    counts: dict[relax.Var, int] = {}
    exprs = [b.value for b in func.body.blocks[0].bindings] + [func.body.body]
    for expr in exprs:
        for v in relax.analysis.free_vars(expr):
            counts[v] = counts.get(v, 0) + 1
    return counts


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
    bindings = list(func.body.blocks[0].bindings)
    calls = [decode(mod, b) for b in bindings]
    pairs = find_pairs(calls, reader_counts(func))
    producers = {p.var for p in pairs.values()}
    bb = builder_without(mod, name)
    with bb.function(name, list(func.params), attrs=dict(func.attrs.items()) if func.attrs else None, pure=func.is_pure):
        with bb.dataflow():
            for b, call in zip(bindings, calls):
                if b.var in producers:
                    continue
                if b.var in pairs:
                    producer = pairs[b.var]
                    prim, op = fused_kernel(producer, call)
                    gv = bb.add_func(prim, op)
                    value = relax.call_tir(gv, relax.Tuple(arguments(producer, call)), b.var.ty)
                    bb.emit_normalized(relax.VarBinding(b.var, bb.normalize(value)))
                    continue
                bb.emit_normalized(b)
        bb.emit_func_output(func.body.body)
    return bb.get()


def relax_function_names(mod: tvm.IRModule) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]


def placeholders(args, first: int = 0) -> list[te.Tensor]:
    """TE placeholders for a kernel call's Relax arguments (to rebuild its TE with another stage around it)."""
    return [te.placeholder(shape_of(a), str(a.ty.dtype), f"arg{first + i}") for i, a in enumerate(args)]


def wide_shift(shift) -> bool:
    """Whether the optimized kernels may requantize with the cheaper wide-shift steps (te_kernels.requant_preclamp)."""
    return (current_variant() == "optimized" and isinstance(shift, tvm.ir.Constant)
            and int(shift.value.numpy().min()) >= te_kernels.WIDE_SHIFT)
