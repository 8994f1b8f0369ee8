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

from tvm_tinytrain.ops import te_backward, te_kernels, tir_conv_gemm, tir_depthwise
from tvm_tinytrain.ops.schedule import compact_schedule, current_variant
from tvm_tinytrain.relax_build import kernel_attrs

from ._fusion import fuse_pairs, placeholders, relax_function_names, wide_shift
from ._ir import shape_of


def accumulator(acc_call, args: list[te.Tensor], pad: int | None = None) -> te.Tensor:
    """The TE of an accumulating kernel call, including a weight merged from a flash original and a RAM slice
    (``pad=0``: ``args[0]`` is the input already padded)."""
    if acc_call.op == "linear_acc":
        return te_kernels.linear_acc(*args, acc_call.attrs["x_zero"])
    return conv_accumulator(acc_call.attrs, args, pad)


def conv_accumulator(attrs: dict, args: list[te.Tensor], pad: int | None = None, pad_h: int | None = None) -> te.Tensor:
    """The TE of a conv with ``attrs`` on ``(x, weight[, trained slice])``: a partially trained weight is merged from
    its flash original and RAM slice; ``pad``, ``pad_h`` as in :func:`te_kernels.conv2d_acc`."""
    x, w = args[0], args[1]
    if len(args) == 3:  # SparseUpdate's partially trained weight: (x, frozen, trained slice)
        w = te_backward.merge_channels(args[1], args[2], 0 if attrs["groups"] > 1 else 1, tuple(attrs["merged_channels"]))
    return te_kernels.conv2d_acc(x, w, attrs["x_zero"], attrs["stride"], attrs["groups"], pad, pad_h)


def fused_conv_requant(acc_call, rq_call) -> tvm.tirx.PrimFunc:
    """One PrimFunc: the accumulation then requantize, scheduled so the accumulator is a scalar."""
    if acc_call.op == "conv2d_acc":
        args = [*acc_call.args, *rq_call.args[1:]]
        return conv_requant_func({**acc_call.attrs, **rq_call.attrs}, [(shape_of(a), str(a.ty.dtype)) for a in args], rq_call.args[3])
    r = rq_call.attrs
    acc_args = placeholders(acc_call.args)
    rq_args = placeholders(rq_call.args[1:], len(acc_args))
    y = te_kernels.requantize(accumulator(acc_call, acc_args), *rq_args, r["y_zero"], r["qmin"], r["qmax"], wide_shift(rq_call.args[3]))
    return compact_schedule(te.create_prim_func([*acc_args, *rq_args, y])).without_attr("global_symbol")


def conv_requant_func(attrs: dict, arg_types: list[tuple[tuple[int, ...], str]], shift, pad_h: int | None = None) -> tvm.tirx.PrimFunc:
    """The ``conv2d_requant`` PrimFunc of a conv with the (merged) conv and requantize ``attrs``, on arguments of
    ``arg_types`` = (shape, dtype) of ``(x, w[, trained slice], bias, mult, shift)``; ``pad_h`` as in
    :func:`te_kernels.conv2d_acc`.  In the optimized variant a conv that :func:`tir_conv_gemm.fits` is the DSP GEMM
    kernel, and a depthwise band kernel (``pad_h=0``) the TIR plane kernel of :mod:`tir_depthwise`."""
    a = attrs
    (n, ic, h, w), (oc, _, k, _) = arg_types[0][0], arg_types[1][0]
    merged = len(arg_types) == 6
    pad = (k - 1) // 2
    wo = (w + 2 * pad - k) // a["stride"] + 1
    optimized = current_variant() == "optimized"
    if optimized and a["groups"] == 1 and tir_conv_gemm.fits(ic, oc, n, wo, k, merged=merged):
        return tir_conv_gemm.conv_requant(ic, oc, h, w, k, a["stride"], a["x_zero"], a["y_zero"], a["qmin"], a["qmax"], wide_shift(shift),
                                          tuple(a.get("merged_channels", ())), pad_h)
    if optimized and a["groups"] > 1 and pad_h == 0 and not merged and n == 1:
        quant = {key: a[key] for key in ("x_zero", "y_zero", "qmin", "qmax")}
        return tir_depthwise.depthwise_conv_requant(ic, h, w, k, a["stride"], quant, wide_shift(shift), pad_h=0)
    args = [te.placeholder(s, d, f"arg{i}") for i, (s, d) in enumerate(arg_types)]
    n_acc = len(args) - 3  # (x, weight[, trained slice]) then (bias, multiplier, shift)
    acc = conv_accumulator(a, args[:n_acc], pad_h=pad_h)
    y = te_kernels.requantize(acc, *args[n_acc:], a["y_zero"], a["qmin"], a["qmax"], wide_shift(shift))
    return compact_schedule(te.create_prim_func([*args, y])).without_attr("global_symbol")


@tvm.transform.module_pass(opt_level=0, name="FuseConvRequant")
class FuseConvRequant:
    """Fuse every ``conv2d_acc``/``linear_acc`` whose only reader is a ``requantize`` into one kernel."""

    def __init__(self, func_names: tuple[str, ...] | None = None):
        self.func_names = func_names

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        names = relax_function_names(mod, "FuseConvRequant", self.func_names or None)
        mod = relax.transform.CanonicalizeBindings()(mod)  # an alias between the conv and its requantize would hide the pair
        for name in names:
            mod = fuse_pairs(mod, name, _pairs, _fused_kernel)
        return relax.transform.DeadCodeElimination(names)(mod)


def _pairs(calls, readers) -> dict:
    """requantize var -> the accumulating kernel it alone reads."""
    single = {c.var: c for c in calls if c is not None and c.op in ("conv2d_acc", "linear_acc") and readers.get(c.var) == 1}
    return {c.var: single[c.args[0]] for c in calls if c is not None and c.op == "requantize" and c.args[0] in single}


def _fused_kernel(acc, rq) -> tuple[tvm.tirx.PrimFunc, str]:
    op = "conv2d_requant" if acc.op == "conv2d_acc" else "linear_requant"
    attrs = {k: v for k, v in {**acc.attrs, **rq.attrs}.items() if k != "node"}
    return fused_conv_requant(acc, rq).with_attrs(kernel_attrs(op, rq.node, **attrs)), op
