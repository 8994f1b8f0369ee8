"""DepthwiseInPlace: a depthwise kernel whose operand dies there writes its output over that operand.

A depthwise conv reads input channel ``c`` only to produce output channel
``c``, and so does its input gradient (of the output gradient).  If each
operand channel plane is first copied to a small workspace, the output may
overwrite the operand: output channel ``c`` occupies bytes
``[c*Ho*Wo, (c+1)*Ho*Wo)``, which cover operand channels ``<= c`` only, all
of them already copied.  This pass re-emits each depthwise ``conv2d_requant``
and stride-1 depthwise ``conv2d_input_grad`` whose operand has no later
reader (and is not a function input) as ``depthwise_in_place`` /
``depthwise_input_grad_in_place``: the same arithmetic in the same order,
scheduled with one operand plane staged per channel (in the optimized variant, the convs are
the TIR kernel of ``tvm_tinytrain/ops/tir_depthwise.py``).  PlanMemory then lets
the output share the operand's storage (PAPER.md section 5: "depthwise in
place"), e.g. MCUNet's first depthwise conv needs 64 KB instead of 128 KB.
Planes larger than ``max_plane_bytes`` stay as they were (the plane is a
buffer in the C kernel's workspace).  A strided input gradient is larger than its
operand, so it cannot overwrite it.

Before::

    lv2 = R.call_tir(cls.conv2d_requant, (lv1, w_dw, b, c0, c1), R.Tensor((1, 16, 64, 64), "int8"))

After (``lv1`` read by nobody later)::

    lv2 = R.call_tir(cls.depthwise_in_place, (lv1, w_dw, b, c0, c1), R.Tensor((1, 16, 64, 64), "int8"))
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te

from tvm_tinytrain.model import DTYPE_BYTES
from tvm_tinytrain.ops import te_backward, te_kernels, tir_depthwise
from tvm_tinytrain.ops.schedule import current_variant, finish_tile, stage_at, tile_reduction
from tvm_tinytrain.relax_build import kernel_attrs

from ._fusion import PlanePass, conv_quant, placeholders, reader_positions, reemit, wide_shift
from ._ir import decode, shape_of
from .fuse_conv_requant import accumulator


def _staged(outputs_of, call, pad: int = 0, pad_value=0) -> tvm.tirx.PrimFunc:
    """``outputs_of(plane, args)`` with ``plane`` a per-channel staged copy of operand 0 (with ``pad`` elements of
    ``pad_value`` around it), copied before any output element is written."""
    args = placeholders(call.args)
    x = args[0]
    plane = te_kernels.pad_plane(x, pad, pad_value) if pad else te.compute(x.shape, lambda *idx: x[idx], name="plane")
    out = outputs_of(plane, args)
    sch = s_tir.Schedule(te.create_prim_func([*args, out]))
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "w_merged" in blocks:
        sch.compute_inline(blocks["w_merged"])
    main = blocks.get("acc", blocks.get("g_x"))
    name = sch.get(main).name_hint
    tiled = current_variant() == "optimized" and tile_reduction(sch, main)
    for consumer in sch.get_consumers(main):  # requantize, or a tile's write-back: per output pixel (or tile)
        sch.reverse_compute_at(consumer, sch.get_loops(main)[3])
    sch.compute_at(blocks["plane"], sch.get_loops(main)[1])  # one operand plane per channel
    if "w_real" in blocks and not stage_at(sch, blocks["w_real"]):  # an input gradient's real weights, per channel
        sch.compute_inline(blocks["w_real"])
    if tiled:
        finish_tile(sch, name)
    return sch.mod["main"].without_attr("global_symbol")


def _plane_bytes(x, pad: int) -> int:
    _, _, h, w = shape_of(x)
    return (h + 2 * pad) * (w + 2 * pad) * DTYPE_BYTES[str(x.ty.dtype)]


def _padding(call, max_plane: int) -> int:
    """The optimized forward kernel stages a zero-point-padded plane (when it fits), so its inner loops need no bounds checks."""
    pad = (shape_of(call.args[1])[2] - 1) // 2
    optimized = call.op == "conv2d_requant" and current_variant() == "optimized"
    return pad if optimized and _plane_bytes(call.args[0], pad) <= max_plane else 0


def _conv_requant(call, max_plane: int):
    a = call.attrs
    pad = _padding(call, max_plane)
    (n, c, h, w), k = shape_of(call.args[0]), shape_of(call.args[1])[2]
    if current_variant() == "optimized" and pad == (k - 1) // 2 and len(call.args) == 5 and n == 1:
        return tir_depthwise.depthwise_conv_requant(c, h, w, k, a["stride"], conv_quant(call), wide_shift(call.args[-1]))

    def outputs_of(plane, args):
        n_acc = len(args) - 3  # (x, weight[, trained slice]) then (bias, multiplier, shift)
        acc = accumulator(call, [plane, *args[1:n_acc]], pad=0 if pad else None)
        return te_kernels.requantize(acc, *args[n_acc:], a["y_zero"], a["qmin"], a["qmax"], wide_shift(call.args[-1]))

    return _staged(outputs_of, call, pad, a["x_zero"])


def _input_grad(call, max_plane: int):
    a = call.attrs

    def outputs_of(plane, args):
        w = args[1]
        if len(args) == 4:  # SparseUpdate's partially trained weight: (g, frozen, trained slice, scales)
            w = te_backward.merge_channels(args[1], args[2], 0, tuple(a["merged_channels"]))
        return te_backward.conv2d_input_grad(plane, w, args[-1], shape_of(call.var), 1, a["groups"])

    return _staged(outputs_of, call)


# op -> (in-place op, builder, extra condition)
_REWRITES = {
    "conv2d_requant": ("depthwise_in_place", _conv_requant, lambda call: True),
    "conv2d_input_grad": ("depthwise_input_grad_in_place", _input_grad, lambda call: call.attrs["stride"] == 1),
}


def _eligible(call, last_reader: dict, i: int, params, max_plane: int) -> bool:
    if call is None or call.op not in _REWRITES or call.attrs["groups"] <= 1 or not _REWRITES[call.op][2](call):
        return False
    x = call.args[0]
    return x not in params and last_reader.get(x) == i and _plane_bytes(x, 0) <= max_plane


@tvm.transform.module_pass(opt_level=0, name="DepthwiseInPlace")
class DepthwiseInPlace(PlanePass):
    """Re-emit every depthwise kernel whose operand dies there as an in-place kernel (run last before PlanMemory)."""

    @staticmethod
    def _rewrite(mod, name: str, max_plane: int) -> tvm.IRModule:
        func = mod[name]
        bindings = list(func.body.blocks[0].bindings)
        last, params = {v: p[-1] for v, p in reader_positions(func).items()}, set(func.params)
        calls = [decode(mod, b) for b in bindings]
        eligible = {b.var: c for i, (b, c) in enumerate(zip(bindings, calls)) if _eligible(c, last, i, params, max_plane)}
        if not eligible:
            return mod

        def emit(bb, binding) -> bool:
            call = eligible.get(binding.var)
            if call is None:
                return False
            op, build, _ = _REWRITES[call.op]
            attrs = {k: v for k, v in call.attrs.items() if k != "node"}
            gv = bb.add_func(build(call, max_plane).with_attrs(kernel_attrs(op, call.node, **attrs)), op)
            bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(relax.call_tir(gv, relax.Tuple(call.args), binding.var.ty))))
            return True

        return reemit(mod, name, emit)
