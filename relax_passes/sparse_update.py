"""SparseUpdate: keep only the updates a sparse scheme trains, and everything they need.

From the full ``train_step`` of :class:`QuantizedGradient` this pass keeps the
SGD updates of the classifier, of the biases of the last ``n_bias_update``
convs and of the weights in ``weight_idx``; a weight with a ratio below 1
trains only its largest-magnitude input channels (depthwise: output
channels), so its gradient kernel reads a saved slice of the conv input
(``gather_channels``, taken right after the forward conv) instead of the
whole input.  Then dead-code elimination removes every backward kernel no
kept update needs; in particular the input-gradient chain stops at the
earliest trained layer, frozen layers keep no activations, and no mask is
computed for a clamp the gradient does not cross.

The scheme is a spelling of ``tvm_tinytrain.scheme.parse_scheme`` (e.g.
``paper-99kb``, ``bias-only:8``, ``last-k:4``, ``full`` or a JSON path), or a
``SparseScheme``.  Conv indices are counted over the ``conv2d_acc`` kernels
in forward order, as in the paper.

Before (full update of a conv)::

    lv4 = R.call_tir(cls.conv2d_acc, (lv3, w4), ...)
    ...
    g_w4 = R.call_tir(cls.conv2d_weight_grad, (lv3, g_acc4, s4), ...)
    w4_new = R.call_tir(cls.sgd_update_int8, (w4, g_w4, lr), ...)

After (``weight_ratio`` 0.25 for that conv)::

    lv4 = R.call_tir(cls.conv2d_acc, (lv3, w4), ...)
    lv3_sel = R.call_tir(cls.gather_channels, (lv3,), R.Tensor((1, 12, 8, 8), "int8"))
    ...
    g_w4 = R.call_tir(cls.conv2d_weight_grad, (lv3_sel, g_acc4, s4), R.Tensor((96, 12, 1, 1), "float32"))
    w4_new = R.call_tir(cls.sgd_update_int8, (w4, g_w4, lr), ...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.ops import te_backward, te_kernels
from tvm_tinytrain.relax_build import emit_kernel
from tvm_tinytrain.scheme import SparseScheme, selected_channels, validate_scheme

from ._buffers import SGD_OPS
from ._fusion import relax_function_names
from ._ir import builder_without, decode, get_function, shape_of, with_function
from .append_loss import HEAD_PARAMS
from .config import option
from .quantized_gradient import emit_weight_grad


class _ConvView:
    """What scheme helpers need of a conv: name, weight, depthwise-ness (duck-types model.Conv2D)."""

    def __init__(self, name, weight, groups):
        self.name, self.weight, self.groups = name, weight, groups
        self.depthwise = groups > 1
        self.in_channels = weight.shape[1] * groups


class _ModelView:
    """The facts of the model that ``parse_scheme`` reads, recovered from the IR."""

    def __init__(self, name, convs):
        self.name, self._convs = name, convs

    def convs(self):
        return self._convs


def _resolve_scheme(spec, mod, convs) -> SparseScheme:
    from tvm_tinytrain.scheme import parse_scheme

    name = str(mod.attrs["tinytrain.model_name"]) if mod.attrs and "tinytrain.model_name" in mod.attrs else "model"
    view = _ModelView(name, convs)
    if isinstance(spec, SparseScheme):
        validate_scheme(spec, view)
        return spec
    return parse_scheme(str(spec), view)


@tvm.transform.module_pass(opt_level=0, name="SparseUpdate")
class SparseUpdate:
    """Prune ``train_step`` to the updates of a sparse scheme."""

    def __init__(self, scheme: str | SparseScheme | None = None, func_name: str = "train_step"):
        self.scheme = scheme
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = get_function(mod, self.func_name, "SparseUpdate")
        bindings = list(func.body.blocks[0].bindings)
        calls = [decode(mod, b) for b in bindings]
        init = dict(mod.attrs["tinytrain.param_init"]) if mod.attrs and "tinytrain.param_init" in mod.attrs else None
        if init is None:
            raise TinyTrainError("SparseUpdate: the module has no 'tinytrain.param_init' (build it with tvm_tinytrain.relax_build)")
        fwd_convs = [c for c in calls if c is not None and c.op == "conv2d_acc"]
        if not fwd_convs:
            raise TinyTrainError(f"SparseUpdate: '{self.func_name}' has no conv2d_acc kernels: run it right after QuantizedGradient, "
                                 "before the fusions")
        convs = [_ConvView(c.node, init[c.args[1].name].numpy(), c.attrs["groups"]) for c in fwd_convs]
        scheme = _resolve_scheme(option("scheme", self.scheme), mod, convs)
        if func.attrs and "tinytrain.scheme_json" in func.attrs:  # pruned already: the same scheme again changes nothing
            if json.loads(str(func.attrs["tinytrain.scheme_json"])) == scheme.to_json():
                return mod
            raise TinyTrainError(f"SparseUpdate: '{self.func_name}' is already pruned to scheme {str(func.attrs['tinytrain.scheme'])!r}; "
                                 f"scheme {scheme.name!r} needs QuantizedGradient's whole training step")

        first_bias = len(convs) - scheme.n_bias_update
        keep = set(HEAD_PARAMS)
        keep |= {fwd_convs[i].args[1].name for i in scheme.weight_idx}
        keep |= {_bias_of(calls, fwd_convs[i]).name for i in range(first_bias, len(convs))}
        splits = {}
        for i, ratio in zip(scheme.weight_idx, scheme.weight_ratio):
            chans = selected_channels(convs[i], ratio)
            w = fwd_convs[i].args[1]
            axis = 0 if fwd_convs[i].attrs["groups"] > 1 else 1
            if len(chans) < shape_of(w)[axis]:
                splits[w.name] = _Split(w.name, axis, chans, shape_of(w))
                init[splits[w.name].name] = tvm.runtime.tensor(np.ascontiguousarray(np.take(init[w.name].numpy(), chans, axis=axis)))

        bb = builder_without(mod, self.func_name, "infer")
        step_slices = {k: sp.var() for k, sp in splits.items()}
        with bb.function(self.func_name, [*func.params, *step_slices.values()], attrs={"num_input": int(func.attrs["num_input"])}):
            with bb.dataflow():
                loss, new_values = self._rewrite(bb, bindings, calls, keep, splits, step_slices)
                result = bb.emit_output(relax.Tuple([loss, *(v for _, v in new_values)]))
            bb.emit_func_output(result)
        if "infer" in [gv.name_hint for gv in mod.get_global_vars()]:
            _emit_infer_with_slices(bb, mod, splits)
        out = bb.get()
        attrs = {k: v for k, v in func.attrs.items() if k not in ("num_input", "tinytrain.updated_params")}
        new_func = out[self.func_name].with_attrs({**attrs, "tinytrain.updated_params": [n for n, _ in new_values],
                                                    "tinytrain.scheme": scheme.name, "tinytrain.scheme_json": json.dumps(scheme.to_json())})
        out = with_function(out, self.func_name, new_func)
        out = out.with_attr("tinytrain.param_init", init).with_attr(
            "tinytrain.trained_slices", json.dumps({sp.name: {"base": sp.base, "axis": sp.axis, "channels": list(sp.channels)}
                                                    for sp in splits.values()}))
        return relax.transform.DeadCodeElimination(relax_function_names(out))(out)

    @staticmethod
    def _rewrite(bb, bindings, calls, keep, splits, slices):
        """Re-emit the step: drop frozen updates; partially trained weights read a merge of their RAM slice
        and their flash original, and their gradient and update cover the slice only."""
        final = bindings[-1].value
        if not isinstance(final, relax.Tuple):
            raise TinyTrainError("SparseUpdate: 'train_step' must end in the (loss, *updated params) tuple of QuantizedGradient")
        saved: dict[relax.Var, relax.Var] = {}  # conv input -> its saved channel slice
        sliced_grads: dict[relax.Var, relax.Var] = {}  # full weight gradient -> its channel-sliced replacement
        new_values = []
        for binding, call in zip(bindings[:-1], calls[:-1]):
            param = call.attrs.get("param") if call is not None else None
            if call is not None and call.op in SGD_OPS:
                if param not in keep:
                    continue
                if param in splits:
                    _, g, lr = call.args
                    new = emit_kernel(bb, te_backward.sgd_update_int8, (slices[param], sliced_grads[g], lr), call.op, call.node,
                                      {"param": splits[param].name})
                    new_values.append((splits[param].name, new))
                    continue
                new_values.append((param, binding.var))
            elif call is not None and call.op == "conv2d_weight_grad" and param in splits:
                a, chans = call.attrs, splits[param].channels
                scale = call.args[2]
                if a["depthwise"]:  # one scale per gradient row: the kept channels'
                    scale = relax.const(scale.value.numpy()[list(chans)])
                # A new var: the sliced gradient has another shape than the full one it replaces.
                sliced_grads[binding.var] = emit_weight_grad(bb, (saved[call.args[0]], call.args[1], scale), call.node,
                                                             {**a, "channels": list(chans)}, chans if a["depthwise"] else None)
                continue
            elif call is not None and call.op in ("conv2d_acc", "conv2d_input_grad") and call.args[1].name in splits:
                _rebind(bb, binding, _with_merged_weight(bb, call, splits[call.args[1].name], slices[call.args[1].name], binding.var))
                if call.op == "conv2d_acc":
                    sp = splits[call.args[1].name]
                    saved[call.args[0]] = emit_kernel(bb, te_backward.gather_channels, (call.args[0],), "gather_channels", call.node,
                                                      {"channels": list(sp.channels)}, (sp.channels,))
                continue
            bb.emit_normalized(binding)
        return final.fields[0], new_values


@dataclass(frozen=True)
class _Split:
    """A partially trained weight: its trained channels live in RAM as ``<base>_trained``, the rest stays in flash."""

    base: str
    axis: int
    channels: tuple[int, ...]
    full_shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.base}_trained"

    def var(self) -> relax.Var:
        shape = list(self.full_shape)
        shape[self.axis] = len(self.channels)
        return relax.Var(self.name, relax.TensorType(shape, "int8"))


def _with_merged_weight(bb, call, split: _Split, trained: relax.Var, out_var):
    """Re-emit a conv or input-gradient kernel reading the merge of the flash weight and its RAM slice.

    The merge is a stage of the same kernel, so the compact schedule inlines it into the weight reads:
    the whole weight is never materialised in RAM.
    """
    a = call.attrs

    def merged(frozen, slice_):
        return te_backward.merge_channels(frozen, slice_, split.axis, split.channels)

    if call.op == "conv2d_acc":
        fn = lambda x, wf, wt: te_kernels.conv2d_acc(x, merged(wf, wt), a["x_zero"], a["stride"], a["groups"])  # noqa: E731
        args = (call.args[0], call.args[1], trained)
    else:
        in_shape = shape_of(out_var)
        fn = lambda g, wf, wt, s: te_backward.conv2d_input_grad(g, merged(wf, wt), s, in_shape, a["stride"], a["groups"])  # noqa: E731
        args = (call.args[0], call.args[1], trained, call.args[2])
    return emit_kernel(bb, fn, args, call.op, call.node, {**a, "merged_channels": list(split.channels)})


def _emit_infer_with_slices(bb, mod, splits) -> None:
    """``infer`` with the same RAM slices as parameters, so evaluation sees the trained weights."""
    func = mod["infer"]
    slices = {k: sp.var() for k, sp in splits.items()}
    with bb.function("infer", [*func.params, *slices.values()], attrs=dict(func.attrs.items())):
        with bb.dataflow():
            for b in func.body.blocks[0].bindings:
                call = decode(mod, b)
                if call is not None and call.op == "conv2d_acc" and call.args[1].name in splits:
                    _rebind(bb, b, _with_merged_weight(bb, call, splits[call.args[1].name], slices[call.args[1].name], b.var))
                else:
                    bb.emit_normalized(b)
        bb.emit_func_output(func.body.body)


def _rebind(bb, binding, value) -> None:
    """Bind the original var to a replacement so later bindings that read it stay valid."""
    bb.emit_normalized(relax.VarBinding(binding.var, value))


def _bias_of(calls, conv_call):
    """The bias parameter of a conv: the second argument of the clamp kernel reading its accumulator."""
    for c in calls:
        if c is not None and c.op == "requantize" and c.args[0].same_as(conv_call.var):
            return c.args[1]
    raise TinyTrainError(f"SparseUpdate: node {conv_call.node!r}: no requantize follows the conv")
