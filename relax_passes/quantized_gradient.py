"""QuantizedGradient: compile-time reverse-mode autodiff of the int8 graph, with QAS and SGD.

TVM's ``relax.transform.Gradient`` differentiates high-level float operators;
our graph is int8 ``call_tir`` kernels, whose derivatives are defined on the
real values they encode (``real = scale * (q - zero)``).  This pass therefore
applies our own rule per kernel (read from the ``tinytrain.op`` attribute),
with float32 backward arithmetic:

- requantize / residual add + clamp: a ``clamp_mask`` kernel packs 1 bit per
  output (1 = strictly inside the clamp range); the backward selects by it;
- conv2d: input gradient (transposed conv with ``w_scale * W``), weight and
  bias gradients;
- global average pool, the float32 classifier, softmax cross-entropy.

Weight and bias gradients are w.r.t. the int8 weights ``W`` and int32 biases
``b`` and, with QAS (PAPER.md section 2), rescaled: ``G_W * s_w^-2`` and
``G_b * (s_w s_x)^-2``.  Without QAS they are the raw gradients, whose
magnitudes the paper shows to be mismatched.  Each parameter then gets an SGD
update (no momentum) that saturates to int8 / int32; the float32 classifier a
float update.  All updates come after the whole backward, as a conventional
optimizer would run them; :class:`ReorderUpdates` moves them earlier.

Every weight and bias gets a gradient here (the full update); SparseUpdate
then prunes what its scheme freezes.

Before (``main`` from AppendLoss)::

    def main(input, label, w0, b0, ..., classifier_weight, classifier_bias):
        lv = R.call_tir(cls.conv2d_acc, (input, w0), ...)
        lv1 = R.call_tir(cls.requantize, (lv, b0, c0, c1), ...)
        ...
        ce = R.call_tir(cls.softmax_cross_entropy, (logits, label), ...)
        gv = ce[0]

After (added)::

    def train_step(input, label, lr: R.Tensor((1,), "float32"), w0, b0, ...):
        lv1 = R.call_tir(cls.requantize, (lv, b0, c0, c1), R.Tensor((1, 8, 64, 64), "int8"))
        m1 = R.call_tir(cls.clamp_mask, (lv1,), R.Tensor((4096,), "uint8"))
        ...
        g_acc = R.call_tir(cls.apply_mask, (g_lv1, m1), ...)
        g_w0 = R.call_tir(cls.conv2d_weight_grad, (input, g_acc, s), ...)
        ...
        w0_new = R.call_tir(cls.sgd_update_int8, (w0, g_w0, lr), ...)
        gv = (loss, w0_new, b0_new, ...)

``train_step`` returns the loss and the updated parameters, in the order of
the function attribute ``tinytrain.updated_params``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.ops import te_backward
from tvm_tinytrain.relax_build import emit_kernel

from ._ir import decode, get_function, shape_of, with_function
from .config import option


def _const(values, dtype="float32") -> relax.Constant:
    return relax.const(np.ascontiguousarray(np.asarray(values, dtype=dtype)))


class _Backward:
    """Emits the backward of one function into ``bb``; keeps the adjoints and the updates."""

    def __init__(self, bb: relax.BlockBuilder, lr: relax.Var, qas: bool):
        self.bb = bb
        self.lr = lr
        self.qas = qas
        self.adjoint: dict[relax.Var, relax.Expr] = {}
        self.masks: dict[relax.Var, relax.Expr] = {}  # int8 output var -> its mask
        self.producers: dict[relax.Var, object] = {}  # var -> KernelCall
        self.updates: list[tuple] = []  # deferred: (param, kernel, args, node, attrs)

    def accumulate(self, var, grad, node: str) -> None:
        if var in self.adjoint:
            grad = emit_kernel(self.bb, te_backward.add_f32, (self.adjoint[var], grad), "add_f32", node, {})
        self.adjoint[var] = grad

    def defer_update(self, param, kernel, args, node, attrs=None) -> None:
        self.updates.append((param, kernel, args, node, attrs or {}))

    # ---- one rule per kernel -------------------------------------------------
    def linear_float(self, call) -> None:
        x, w, b = call.args
        g = self.adjoint[call.var]
        x_zero, x_scale = call.attrs["x_zero"], call.attrs["x_scale"]
        grads = emit_kernel(self.bb, lambda xt, wt, gt: te_backward.linear_float_grads(xt, x_zero, x_scale, wt, gt), (x, w, g),
                            "linear_float_grads", call.node, {"x_zero": x_zero, "x_scale": x_scale})
        g_x, g_w, g_b = (self.bb.emit(relax.TupleGetItem(grads, i)) for i in range(3))
        self.defer_update(w, "sgd_update_f32", (w, g_w), call.node)
        self.defer_update(b, "sgd_update_f32", (b, g_b), call.node)
        self.accumulate(x, g_x, call.node)

    def global_avg_pool(self, call) -> None:
        (x,) = call.args
        _, _, h, w = shape_of(x)
        g = emit_kernel(self.bb, te_backward.global_avg_pool_grad, (self.adjoint[call.var],), "global_avg_pool_grad", call.node,
                        {"h": h, "w": w}, (h, w))
        self.accumulate(x, g, call.node)

    def add_int8(self, call) -> None:
        g = self._masked(call)
        for operand in call.args:
            self.accumulate(operand, g, call.node)

    def requantize(self, call) -> None:
        acc, bias = call.args[0], call.args[1]
        g_acc = self._masked(call)
        conv = self.producers[acc]
        x_scale, w_scales = conv.attrs["x_scale"], np.asarray(conv.attrs["w_scales"], np.float64)
        # QAS: G_b * (s_w s_x)^-2 with G_b = dL/db_real * s_x s_w; plain: G_b itself.
        scale = 1.0 / (x_scale * w_scales) if self.qas else x_scale * w_scales
        g_b = emit_kernel(self.bb, te_backward.bias_grad, (g_acc, _const(scale)), "bias_grad", call.node, {"qas": self.qas})
        self.defer_update(bias, "sgd_update_int32", (bias, g_b), call.node)
        self.adjoint[acc] = g_acc

    def conv2d_acc(self, call) -> None:
        x, w = call.args
        g_acc = self.adjoint[call.var]
        a = call.attrs
        w_scales = np.asarray(a["w_scales"], np.float64)
        o, _, k, _ = shape_of(w)
        depthwise = a["groups"] > 1
        # QAS: G_W * s_w^-2 with G_W = dL/dW_real * s_w and dL/dW_real = s_x * sum(g * (x - z)).
        scale = a["x_scale"] / w_scales if self.qas else a["x_scale"] * w_scales
        channels = tuple(range(o)) if depthwise else None
        attrs = {"param": w.name, "x_zero": a["x_zero"], "stride": a["stride"], "kernel": k, "depthwise": depthwise, "qas": self.qas,
                 "channels": list(channels or range(shape_of(w)[1]))}
        g_w = emit_weight_grad(self.bb, (x, g_acc, _const(scale)), call.node, attrs, channels)
        self.defer_update(w, "sgd_update_int8", (w, g_w), call.node, {"channel_axis": 0 if depthwise else 1})
        if x in self.producers:  # the image needs no gradient
            g_x = emit_kernel(self.bb, te_backward.conv2d_input_grad, (g_acc, w, _const(w_scales)), "conv2d_input_grad", call.node,
                              {"stride": a["stride"], "groups": a["groups"]}, (shape_of(x), a["stride"], a["groups"]))
            self.accumulate(x, g_x, call.node)

    def _masked(self, call):
        return emit_kernel(self.bb, te_backward.apply_mask, (self.adjoint[call.var], self.masks[call.var]), "apply_mask", call.node, {})

    def emit_updates(self) -> list[tuple[str, relax.Var]]:
        """The deferred SGD updates, in parameter order; returns (param name, new value)."""
        kernels = {"sgd_update_int8": te_backward.sgd_update_int8, "sgd_update_int32": te_backward.sgd_update_int32,
                   "sgd_update_f32": te_backward.sgd_update_f32}
        out = []
        for param, kernel, (p, g), node, attrs in self.updates:
            new = emit_kernel(self.bb, kernels[kernel], (p, g, self.lr), kernel, node, {"param": param.name, **attrs})
            out.append((param.name, new))
        return out


def emit_weight_grad(bb, args, node: str, attrs: dict, depthwise_channels):
    """``conv2d_weight_grad`` of ``(x or its channel slice, g_acc, scale)``; SparseUpdate re-emits it sliced."""
    x_zero, stride, kernel = attrs["x_zero"], attrs["stride"], attrs["kernel"]
    return emit_kernel(bb, lambda x, g, s: te_backward.conv2d_weight_grad(x, g, x_zero, stride, kernel, s, depthwise_channels),
                       args, "conv2d_weight_grad", node, attrs)


@tvm.transform.module_pass(opt_level=0, name="QuantizedGradient")
class QuantizedGradient:
    """Add ``train_step``: forward with masks, backward, QAS, and SGD updates of every parameter."""

    def __init__(self, qas: bool | None = None):
        self.qas = qas

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        qas = bool(option("qas", self.qas))
        get_function(mod, "main", "QuantizedGradient")
        if "train_step" in [gv.name_hint for gv in mod.get_global_vars()]:
            raise TinyTrainError("QuantizedGradient: the module has a train_step already (run QuantizedGradient once)")
        # Var-to-var aliases (e.g. an output var of the forward) would hide a tensor's producer.
        mod = relax.transform.CanonicalizeBindings()(mod)
        src = relax.utils.copy_with_new_vars(mod["main"])
        bindings = list(src.body.blocks[0].bindings)
        calls = [decode(mod, b) for b in bindings]
        if not any(c is not None and c.op == "softmax_cross_entropy" for c in calls):
            raise TinyTrainError("QuantizedGradient: 'main' has no softmax_cross_entropy loss; run AppendLoss first")
        lr = relax.Var("lr", relax.TensorType((1,), "float32"))
        params = list(src.params)
        bb = relax.BlockBuilder(mod)
        back = _Backward(bb, lr, qas)
        with bb.function("train_step", [params[0], params[1], lr, *params[2:]], attrs={"num_input": 3}):
            with bb.dataflow():
                loss = self._forward(mod, bb, bindings, calls, back)
                for call in reversed([c for c in calls if c is not None]):
                    rule = getattr(back, call.op, None)
                    if call.op == "softmax_cross_entropy":
                        continue
                    if rule is None:
                        raise TinyTrainError(f"QuantizedGradient: node {call.node!r}: no gradient rule for kernel {call.op!r}")
                    if call.var in back.adjoint:
                        rule(call)
                updated = back.emit_updates()
                result = bb.emit_output(relax.Tuple([loss, *(v for _, v in updated)]))
            bb.emit_func_output(result)
        out = bb.get()
        func = out["train_step"].with_attr("tinytrain.updated_params", [n for n, _ in updated]).with_attr("tinytrain.qas", qas)
        return with_function(out, "train_step", func)

    @staticmethod
    def _forward(mod, bb, bindings, calls, back: _Backward):
        """Re-emit the forward with a mask kernel after each clamp; seed d loss / d logits."""
        loss = ce_var = None
        for binding, call in zip(bindings, calls):
            if call is None:
                bb.emit_normalized(binding)
                value = binding.value
                if isinstance(value, relax.TupleGetItem) and value.index == 0 and ce_var is not None and value.tuple_value.same_as(ce_var):
                    loss = binding.var
                continue
            back.producers[call.var] = call
            bb.emit_normalized(binding)
            if call.op == "softmax_cross_entropy":
                ce_var = call.var
                back.adjoint[call.args[0]] = bb.emit(relax.TupleGetItem(call.var, 1))
            elif call.op in ("requantize", "add_int8"):  # the clamp's gradient, if SparseUpdate keeps a reader
                qmin, qmax = call.attrs["qmin"], call.attrs["qmax"]
                back.masks[call.var] = emit_kernel(bb, te_backward.clamp_mask, (call.var,), "clamp_mask", call.node,
                                                   {"qmin": qmin, "qmax": qmax}, (qmin, qmax))
        if loss is None:
            raise TinyTrainError("QuantizedGradient: could not find the loss output of softmax_cross_entropy")
        return loss
