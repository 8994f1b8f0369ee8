"""AppendLoss: a new float32 classifier of N classes and softmax cross-entropy.

The paper replaces the pre-trained head by a new N-class classifier trained
in float32 (+2.3 % accuracy over an int8 head).  The pass cuts the int8
graph at the input of its classifier (the pooled int8 vector), adds the new
head as parameters ``classifier_weight`` (N, C) and ``classifier_bias`` (N,),
and appends the loss.  It writes two functions:

- ``infer(input, *params) -> float32 logits``, for evaluation;
- ``main(input, label, *params) -> loss``: the training loss.  Its softmax
  kernel also returns d loss / d logits, which :class:`QuantizedGradient` uses.

The new head's initial values go to the module attribute
``tinytrain.param_init`` (seeded normal weights, zero bias).

Before::

    def main(input: R.Tensor((1, 3, 128, 128), "int8"), ..., classifier_weight: R.Tensor((1000, 160), "int8"), classifier_bias):
        ...
        lv99 = R.call_tir(cls.global_avg_pool, (lv98,), R.Tensor((1, 160), "int8"))
        lv100 = R.call_tir(cls.linear_acc, (lv99, classifier_weight), R.Tensor((1, 1000), "int32"))
        gv = R.call_tir(cls.requantize, (lv100, classifier_bias, ...), R.Tensor((1, 1000), "int8"))

After::

    def main(input, label: R.Tensor((1,), "int32"), ..., classifier_weight: R.Tensor((10, 160), "float32"), classifier_bias):
        ...
        lv99 = R.call_tir(cls.global_avg_pool, (lv98,), R.Tensor((1, 160), "int8"))
        logits = R.call_tir(cls.linear_float, (lv99, classifier_weight, classifier_bias), R.Tensor((1, 10), "float32"))
        ce = R.call_tir(cls.softmax_cross_entropy, (logits, label), [R.Tensor((1,), "float32"), R.Tensor((1, 10), "float32")])
        gv = ce[0]
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.ops import te_backward, te_kernels
from tvm_tinytrain.relax_build import emit_kernel

from ._ir import builder_without, dataflow_bindings, decode, get_function, shape_of
from .config import option

HEAD_PARAMS = ("classifier_weight", "classifier_bias")


@tvm.transform.module_pass(opt_level=0, name="AppendLoss")
class AppendLoss:
    """Replace the classifier by a new float32 ``num_classes`` head and append softmax cross-entropy."""

    def __init__(self, num_classes: int | None = None, head_seed: int | None = None):
        self.num_classes = num_classes
        self.head_seed = head_seed

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        num_classes = int(option("num_classes", self.num_classes))
        if num_classes < 2:
            raise TinyTrainError(f"AppendLoss: num_classes must be >= 2, got {num_classes}")
        func = get_function(mod, "main", "AppendLoss")
        if mod.attrs and "tinytrain.num_classes" in mod.attrs:  # AppendLoss's mark, kept by every later pass
            raise TinyTrainError("AppendLoss: the module has its loss already (run AppendLoss once, on the inference module)")
        bindings = dataflow_bindings(func, "AppendLoss")
        head_at = _classifier_position(mod, bindings)
        head = decode(mod, bindings[head_at])
        pooled = head.args[0]
        old_head_params = {a for a in head.args[1:]}
        if head.op == "linear_acc":  # its requantize (bias) follows
            old_head_params |= {a for a in decode(mod, bindings[head_at + 1]).args[1:2]}
        body_params = [p for p in func.params[1:] if p not in old_head_params]

        channels = shape_of(pooled)[1]
        batch = shape_of(func.params[0])[0]
        w = relax.Var(HEAD_PARAMS[0], relax.TensorType((num_classes, channels), "float32"))
        b = relax.Var(HEAD_PARAMS[1], relax.TensorType((num_classes,), "float32"))
        x_zero, x_scale = head.attrs["x_zero"], head.attrs["x_scale"]

        bb = builder_without(mod, "main")

        def emit_body_and_head(params):
            """Re-emit the body up to the pooled vector, then the new head; returns the logits."""
            for binding in bindings[:head_at]:
                bb.emit_normalized(binding)
            return emit_kernel(bb, te_kernels.linear_float, (pooled, w, b), "linear_float", "classifier",
                               {"x_zero": x_zero, "x_scale": x_scale}, (x_zero, x_scale))

        inp = func.params[0]
        with bb.function("infer", [inp, *body_params, w, b], attrs={"num_input": 1}):
            with bb.dataflow():
                out = bb.emit_output(emit_body_and_head(body_params))
            bb.emit_func_output(out)
        infer = bb.get()["infer"]

        # The loss function is a fresh copy (a Relax var may be bound in one function only).
        copy = relax.utils.copy_with_new_vars(infer)
        label = relax.Var("label", relax.TensorType((batch,), "int32"))
        bb = relax.BlockBuilder(bb.get())
        with bb.function("main", [copy.params[0], label, *copy.params[1:]], attrs={"num_input": 2}):
            with bb.dataflow():
                for binding in copy.body.blocks[0].bindings:
                    bb.emit_normalized(binding)
                logits = copy.body.body
                ce = emit_kernel(bb, te_backward.softmax_cross_entropy, (logits, label), "softmax_cross_entropy", "loss", {})
                loss = bb.emit_output(relax.TupleGetItem(ce, 0))
            bb.emit_func_output(loss)
        out_mod = relax.transform.DeadCodeElimination(["main", "infer"])(bb.get())

        rng = np.random.default_rng(int(option("head_seed", self.head_seed)))
        init = dict(mod.attrs["tinytrain.param_init"]) if mod.attrs and "tinytrain.param_init" in mod.attrs else {}
        init[HEAD_PARAMS[0]] = tvm.runtime.tensor(rng.normal(0.0, 0.01, (num_classes, channels)).astype(np.float32))
        init[HEAD_PARAMS[1]] = tvm.runtime.tensor(np.zeros(num_classes, np.float32))
        return out_mod.with_attr("tinytrain.param_init", init).with_attr("tinytrain.num_classes", num_classes)


def _classifier_position(mod, bindings) -> int:
    """Index of the last classifier kernel (linear_acc or linear_float) in ``bindings``."""
    for i in range(len(bindings) - 1, -1, -1):
        call = decode(mod, bindings[i])
        if call is not None and call.op in ("linear_acc", "linear_float"):
            return i
    raise TinyTrainError("AppendLoss: no classifier (linear_acc / linear_float kernel) found in 'main'")
