"""AccumulateGradients: batches of B images at batch size 1, by summing gradients before one update.

Int8 updates round: with batch 1 many per-image steps ``round(-lr * G)``
are 0 and learning stalls; the paper's on-device VWW result uses gradient
accumulation (89.1 % vs 86.6 %).  This pass splits ``train_step`` into

- ``accumulate_step(input, label, lr, *params, *acc) -> (loss, *acc')``: the
  same forward and backward, each SGD update replaced by ``acc += G`` into a
  float32 accumulator of the parameter's gradient (in place on the device);
- ``apply_updates(lr, *params, *acc) -> (*params')``: the SGD updates with the
  accumulated gradients (the host passes ``lr / B`` for a mean).

The accumulators stay in RAM between images: they cost 4 bytes per trained
element, which ``PlanMemory`` of ``accumulate_step`` reports as trainable
state.

Before::

    def train_step(input, label, lr, w, ...):
        g_w = R.call_tir(cls.conv2d_weight_grad, ...)
        w_new = R.call_tir(cls.sgd_update_int8, (w, g_w, lr), ...)
        gv = (loss, w_new, ...)

After (added)::

    def accumulate_step(input, label, lr, w, ..., w_acc: R.Tensor(.., "float32")):
        g_w = R.call_tir(cls.conv2d_weight_grad, ...)
        w_acc_new = R.call_tir(cls.add_f32, (w_acc, g_w), ...)
        gv = (loss, w_acc_new, ...)

    def apply_updates(lr, w, ..., w_acc):
        w_new = R.call_tir(cls.sgd_update_int8, (w, w_acc, lr), ...)
        gv = (w_new, ...)
"""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.ops import te_backward
from tvm_tinytrain.relax_build import emit_kernel

from ._buffers import SGD_OPS
from ._ir import builder_without, decode, get_function, with_function

_SGD = {"sgd_update_int8": te_backward.sgd_update_int8, "sgd_update_int32": te_backward.sgd_update_int32,
        "sgd_update_f32": te_backward.sgd_update_f32}


@tvm.transform.module_pass(opt_level=0, name="AccumulateGradients")
class AccumulateGradients:
    """Add ``accumulate_step`` and ``apply_updates`` built from ``train_step``."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        step = get_function(mod, "train_step", "AccumulateGradients")
        bindings = list(step.body.blocks[0].bindings)
        calls = [c for c in (decode(mod, b) for b in bindings) if c is not None]
        if any(c.op == "conv2d_weight_grad_sgd" for c in calls):
            raise TinyTrainError("AccumulateGradients: 'train_step' has fused weight updates; run it before FuseWeightUpdate")
        updates = [c for c in calls if c.op in SGD_OPS]
        if not updates:
            raise TinyTrainError("AccumulateGradients: 'train_step' updates no parameter")
        if any(len(c.args) != 3 for c in updates):
            raise TinyTrainError("AccumulateGradients: run it before anything that changes the SGD kernels' arguments")
        names = [str(n) for n in step.attrs["tinytrain.updated_params"]]
        by_name = {str(c.attrs["param"]): c for c in updates}
        bb = builder_without(mod, "accumulate_step", "apply_updates")
        self._emit_accumulate(bb, mod, step, bindings, names, by_name)
        self._emit_apply(bb, step, names, by_name)
        out = bb.get()
        acc_names = [f"{n}_acc" for n in names]
        attrs = {"accumulate_step": {"tinytrain.updated_params": acc_names, "tinytrain.ram_params": names + acc_names},
                 "apply_updates": {"tinytrain.updated_params": names, "tinytrain.ram_params": names + acc_names}}
        for fname, extra in attrs.items():
            out = with_function(out, fname, out[fname].with_attrs(extra))
        return out

    @staticmethod
    def _acc_var(call) -> relax.Var:
        g = call.args[1]
        return relax.Var(f"{call.attrs['param']}_acc", relax.TensorType([int(d) for d in g.ty.shape], "float32"))

    def _emit_accumulate(self, bb, mod, step, bindings, names, by_name) -> None:
        src = relax.utils.copy_with_new_vars(step)
        src_bindings = list(src.body.blocks[0].bindings)
        src_updates = {str(c.attrs["param"]): c for c in (decode(mod, b) for b in src_bindings) if c is not None and c.op in SGD_OPS}
        accs = {n: self._acc_var(src_updates[n]) for n in names}
        new_acc = {}
        with bb.function("accumulate_step", [*src.params, *accs.values()], attrs={"num_input": int(step.attrs["num_input"])}):
            with bb.dataflow():
                for b in src_bindings[:-1]:
                    call = decode(mod, b)
                    if call is not None and call.op in SGD_OPS:
                        name = str(call.attrs["param"])
                        new_acc[name] = emit_kernel(bb, te_backward.add_f32, (accs[name], call.args[1]), "add_f32", call.node,
                                                    {"accumulates": name})
                        continue
                    bb.emit_normalized(b)
                loss = src_bindings[-1].value.fields[0]  # train_step ends in (loss, *updated params)
                result = bb.emit_output(relax.Tuple([loss, *(new_acc[n] for n in names)]))
            bb.emit_func_output(result)

    def _emit_apply(self, bb, step, names, by_name) -> None:
        lr = relax.Var("lr", relax.TensorType((1,), "float32"))
        params = {n: relax.Var(n, by_name[n].args[0].ty) for n in names}
        accs = {n: self._acc_var(by_name[n]) for n in names}
        with bb.function("apply_updates", [lr, *params.values(), *accs.values()], attrs={"num_input": 1}):
            with bb.dataflow():
                new = []
                for n in names:
                    call = by_name[n]
                    new.append(emit_kernel(bb, _SGD[call.op], (params[n], accs[n], lr), call.op, call.node, {"param": n}))
                result = bb.emit_output(relax.Tuple(new))
            bb.emit_func_output(result)
