"""FuseDepthwiseBackward: an inverted block's depthwise input gradient consumed one channel plane at a time.

Going backwards through ``expand (1x1) -> depthwise``, the depthwise conv's
input gradient is a whole float32 tensor of the expanded width (e.g. 96 KB
for 96 channels of 16x16, the peak of several sparse steps), read only by
the expansion's clamp mask, whose result only the expansion's bias gradient
and input gradient read.  All of these work channel by channel on the
expanded side, so this pass replaces the four kernels with one
``depthwise_block_backward`` kernel (``tvm_tinytrain/ops/tir_backward.py``)
that builds one masked plane at a time and adds it into the bias gradient
and the expansion's input gradient at once: same bits, and only one plane
of the big tensor ever exists.  It applies when the expansion's weight is
frozen (a trained weight would need the whole masked gradient for its own
gradient), when neither weight is a partially trained merge, when a plane
fits ``max_plane_bytes``, and when the depthwise conv is strided: a
stride-1 input gradient is no larger than its operand, so DepthwiseInPlace
already writes it over that operand, with faster (tiled) kernels.  Run it
after ReorderUpdates and before DepthwiseInPlace.

Before::

    g_dw = R.call_tir(cls.conv2d_input_grad, (g_acc, w_dw, s_dw), R.Tensor((1, 96, 16, 16), "float32"))
    g_m = R.call_tir(cls.apply_mask, (g_dw, mask), R.Tensor((1, 96, 16, 16), "float32"))
    g_b = R.call_tir(cls.bias_grad, (g_m, b_scale), R.Tensor((96,), "float32"))
    b_new = R.call_tir(cls.sgd_update_int32, (b, g_b, lr), R.Tensor((96,), "int32"))
    g_x = R.call_tir(cls.conv2d_input_grad, (g_m, w_pw, s_pw), R.Tensor((1, 16, 16, 16), "float32"))

After::

    fused = R.call_tir(cls.depthwise_block_backward, (g_acc, w_dw, s_dw, mask, b_scale, w_pw, s_pw),
                       [R.Tensor((1, 16, 16, 16), "float32"), R.Tensor((96,), "float32")])
    g_x = fused[0]
    g_b = fused[1]
    b_new = R.call_tir(cls.sgd_update_int32, (b, g_b, lr), R.Tensor((96,), "int32"))
"""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_tinytrain.ops.tir_backward import depthwise_block_backward
from tvm_tinytrain.relax_build import kernel_attrs

from ._fusion import PlanePass, reader_counts, reemit
from ._ir import decode, shape_of

OP = "depthwise_block_backward"


def _groups(calls, readers, max_plane: int) -> dict:
    """depthwise input-gradient var -> (depthwise call, mask call, bias-gradient call, expansion input-gradient call)."""
    by_input: dict = {}
    for c in calls:
        if c is not None and c.args:
            by_input.setdefault(c.args[0], []).append(c)
    groups = {}
    for d in calls:
        if (d is None or d.op != "conv2d_input_grad" or d.attrs["groups"] <= 1 or d.attrs["stride"] == 1 or len(d.args) != 3
                or readers.get(d.var) != 1):
            continue
        masks = [m for m in by_input.get(d.var, []) if m.op == "apply_mask"]
        if len(masks) != 1 or readers.get(masks[0].var) != 2:
            continue
        m = masks[0]
        readers_of_m = {c.op: c for c in by_input.get(m.var, [])}
        b, p = readers_of_m.get("bias_grad"), readers_of_m.get("conv2d_input_grad")
        _, _, h, w = shape_of(d.var)
        if (b is None or p is None or p.attrs["groups"] != 1 or len(p.args) != 3 or shape_of(p.args[1])[2:] != (1, 1)
                or p.attrs["stride"] != 1 or h * w * 4 > max_plane):
            continue
        groups[d.var] = (d, m, b, p)
    return groups


def _kernel(d, p) -> tvm.tirx.PrimFunc:
    _, channels, h, w = shape_of(d.var)
    _, _, ho, wo = shape_of(d.args[0])
    in_channels = shape_of(p.var)[1]
    prim = depthwise_block_backward(channels, in_channels, h, w, ho, wo, shape_of(d.args[1])[2], d.attrs["stride"])
    return prim.with_attrs(kernel_attrs(OP, f"{d.node}+{p.node}", stride=d.attrs["stride"]))


@tvm.transform.module_pass(opt_level=0, name="FuseDepthwiseBackward")
class FuseDepthwiseBackward(PlanePass):
    """Fuse each depthwise input gradient with the frozen expansion's mask, bias gradient and input gradient."""

    @staticmethod
    def _rewrite(mod, name: str, max_plane: int) -> tvm.IRModule:
        func = mod[name]
        bindings = list(func.body.blocks[0].bindings)
        calls = [decode(mod, b) for b in bindings]
        groups = _groups(calls, reader_counts(func), max_plane)
        if not groups:
            return mod
        replaced = {c.var for d, m, b, p in groups.values() for c in (m, b, p)}

        def emit(bb, binding) -> bool:
            if binding.var in replaced:
                return True  # now bound by the fused kernel
            if binding.var not in groups:
                return False
            d, m, b, p = groups[binding.var]
            gv = bb.add_func(_kernel(d, p), OP)
            args = [d.args[0], d.args[1], d.args[2], m.args[1], b.args[1], p.args[1], p.args[2]]
            fused = bb.emit(relax.call_tir(gv, relax.Tuple(args), [p.var.ty, b.var.ty]))
            bb.emit_normalized(relax.VarBinding(p.var, relax.TupleGetItem(fused, 0)))
            bb.emit_normalized(relax.VarBinding(b.var, relax.TupleGetItem(fused, 1)))
            return True

        return reemit(mod, name, emit)
