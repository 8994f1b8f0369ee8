"""PointwiseInPlace: a 1x1 conv whose operand dies there writes its output over that operand.

A 1x1 conv (stride 1) computes output pixel ``p`` of every channel from input
pixel ``p`` of every channel only.  In NCHW the output element ``(c, p)``
sits at byte ``c*H*W + p``, which in the operand is ``(c, p)`` too: a pixel
already consumed.  So if each pixel's input column is staged first (every
input channel of that pixel) and only then are its outputs written, the output
may overwrite the operand when it has no more channels than the operand (a
block's projection, e.g. MbV2's first 16 -> 8 projection at 64x64 needs 64 KB
instead of 96 KB).

This pass re-emits each such ``conv2d_requant`` (1x1, stride 1, groups 1,
frozen weight, output no larger than its operand, operand read by nobody later
and not a function input) as ``pointwise_in_place``: the same integer sums,
scheduled pixel by pixel with the column staged.  In the optimized variant
this is the DSP GEMM of ``tvm_tinytrain/ops/tir_conv_gemm.py``, which already
stages the columns of each pixel pair before writing that pair's outputs.
PlanMemory then lets the output share the operand's storage.

Before::

    lv7 = R.call_tir(cls.conv2d_requant, (lv6, w_pw2, b, c0, c1), R.Tensor((1, 8, 64, 64), "int8"))

After (``lv6``, ``(1, 16, 64, 64)``, read by nobody later)::

    lv7 = R.call_tir(cls.pointwise_in_place, (lv6, w_pw2, b, c0, c1), R.Tensor((1, 8, 64, 64), "int8"))
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te

from tvm_tinytrain.ops import te_kernels, tir_conv_gemm
from tvm_tinytrain.ops.schedule import current_variant
from tvm_tinytrain.relax_build import kernel_attrs

from ._fusion import placeholders, reader_positions, reemit, relax_function_names, wide_shift
from ._ir import decode, shape_of


def _eligible(call, last_reader: dict, i: int, params) -> bool:
    if call is None or call.op != "conv2d_requant" or len(call.args) != 5 or call.attrs["groups"] != 1 or call.attrs["stride"] != 1:
        return False
    x = call.args[0]
    (n, ic, _, _), (oc, _, k, _) = shape_of(x), shape_of(call.args[1])
    return k == 1 and n == 1 and oc <= ic and x not in params and last_reader.get(x) == i


def pointwise_in_place(call) -> tvm.tirx.PrimFunc:
    """The kernel: each pixel's column staged, then every output channel of that pixel."""
    a = call.attrs
    (_, ic, h, w), oc = shape_of(call.args[0]), shape_of(call.args[1])[0]
    shift = call.args[-1]
    if current_variant() == "optimized" and tir_conv_gemm.fits(ic, oc, 1, w):
        return tir_conv_gemm.conv_requant(ic, oc, h, w, 1, 1, a["x_zero"], a["y_zero"], a["qmin"], a["qmax"], wide_shift(shift))
    args = placeholders(call.args)
    x = args[0]
    column = te.compute(x.shape, lambda *idx: x[idx], name="column")
    acc = te_kernels.conv2d_acc(column, args[1], a["x_zero"], 1, 1)
    y = te_kernels.requantize(acc, *args[2:], a["y_zero"], a["qmin"], a["qmax"], wide_shift(shift))
    sch = s_tir.Schedule(te.create_prim_func([*args, y]))
    main = sch.get_sblock("acc")
    _, o, oh, ow, *_ = sch.get_loops(main)
    sch.reorder(oh, ow, o)
    for consumer in sch.get_consumers(main):  # requantize each output element as soon as it is summed
        sch.reverse_compute_at(consumer, o)
    sch.compute_at(sch.get_sblock("column"), ow)
    return sch.mod["main"].without_attr("global_symbol")


@tvm.transform.module_pass(opt_level=0, name="PointwiseInPlace")
class PointwiseInPlace:
    """Re-emit every frozen 1x1 conv whose operand dies there, and which is no larger, as an in-place kernel."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        for name in relax_function_names(mod, "PointwiseInPlace"):
            func = mod[name]
            bindings = list(func.body.blocks[0].bindings)
            last, params = {v: p[-1] for v, p in reader_positions(func).items()}, set(func.params)
            eligible = {c.var: c for i, c in enumerate(decode(mod, b) for b in bindings) if _eligible(c, last, i, params)}
            if not eligible:
                continue

            def emit(bb, binding, eligible=eligible) -> bool:
                call = eligible.get(binding.var)
                if call is None:
                    return False
                attrs = {k: v for k, v in call.attrs.items() if k != "node"}
                gv = bb.add_func(pointwise_in_place(call).with_attrs(kernel_attrs("pointwise_in_place", call.node, **attrs)), "pointwise_in_place")
                bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(relax.call_tir(gv, relax.Tuple(call.args), binding.var.ty))))
                return True

            mod = reemit(mod, name, emit)
        return mod
