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

import tvm
from tvm import relax

from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.ops import te_backward
from tvm_tinytrain.relax_build import emit_kernel
from tvm_tinytrain.scheme import SparseScheme, selected_channels, validate_scheme

from ._buffers import SGD_OPS
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
        init = mod.attrs["tinytrain.param_init"] if mod.attrs and "tinytrain.param_init" in mod.attrs else None
        if init is None:
            raise TinyTrainError("SparseUpdate: the module has no 'tinytrain.param_init' (build it with tvm_tinytrain.relax_build)")
        fwd_convs = [c for c in calls if c is not None and c.op == "conv2d_acc"]
        convs = [_ConvView(c.node, init[c.args[1].name].numpy(), c.attrs["groups"]) for c in fwd_convs]
        scheme = _resolve_scheme(option("scheme", self.scheme), mod, convs)

        first_bias = len(convs) - scheme.n_bias_update
        keep = set(HEAD_PARAMS)
        keep |= {fwd_convs[i].args[1].name for i in scheme.weight_idx}
        keep |= {_bias_of(calls, fwd_convs[i]).name for i in range(first_bias, len(convs))}
        channels = {fwd_convs[i].args[1].name: selected_channels(convs[i], r) for i, r in zip(scheme.weight_idx, scheme.weight_ratio)}

        bb = builder_without(mod, self.func_name)
        with bb.function(self.func_name, list(func.params), attrs={"num_input": int(func.attrs["num_input"])}):
            with bb.dataflow():
                loss, new_values = self._rewrite(mod, bb, bindings, calls, keep, channels)
                updated = [name for name, _ in new_values]
                result = bb.emit_output(relax.Tuple([loss, *(v for _, v in new_values)]))
            bb.emit_func_output(result)
        out = bb.get()
        attrs = {k: v for k, v in func.attrs.items() if k not in ("num_input", "tinytrain.updated_params")}
        new_func = out[self.func_name].with_attrs({**attrs, "tinytrain.updated_params": updated,
                                                    "tinytrain.scheme": scheme.name, "tinytrain.scheme_json": str(scheme.to_json())})
        out = with_function(out, self.func_name, new_func)
        return relax.transform.DeadCodeElimination(_relax_functions(out))(out)

    @staticmethod
    def _rewrite(mod, bb, bindings, calls, keep, channels):
        """Re-emit the step: drop frozen updates, slice the gradients of partially trained weights."""
        final = bindings[-1].value
        if not isinstance(final, relax.Tuple):
            raise TinyTrainError("SparseUpdate: 'train_step' must end in the (loss, *updated params) tuple of QuantizedGradient")
        partial = {name: chans for name, chans in channels.items() if len(chans) < _channel_count(mod, calls, name)}
        saved: dict[relax.Var, relax.Var] = {}  # conv input -> its saved channel slice
        sliced_grads: dict[relax.Var, relax.Var] = {}  # full weight gradient -> its channel-sliced replacement
        new_values = []
        for binding, call in zip(bindings[:-1], calls[:-1]):
            param = call.attrs.get("param") if call is not None else None
            if call is not None and call.op in SGD_OPS:
                if param not in keep:
                    continue
                new_values.append((param, binding.var))
                if param in partial and call.op == "sgd_update_int8":
                    a = call.attrs
                    p, g, lr = call.args
                    _rebind(bb, binding, emit_kernel(bb, te_backward.sgd_update_int8, (p, sliced_grads[g], lr), call.op, call.node,
                                                     {**a, "channels": list(partial[param])}, (a["channel_axis"], partial[param])))
                    continue
            elif call is not None and call.op == "conv2d_weight_grad" and param in partial:
                a, chans = call.attrs, partial[param]
                scale = call.args[2]
                if a["depthwise"]:  # one scale per gradient row: the kept channels'
                    scale = relax.const(scale.value.numpy()[list(chans)])
                # A new var: the sliced gradient has another shape than the full one it replaces.
                sliced_grads[binding.var] = emit_weight_grad(bb, (saved[call.args[0]], call.args[1], scale), call.node,
                                                             {**a, "channels": list(chans)}, chans if a["depthwise"] else None)
                continue
            bb.emit_normalized(binding)
            if call is not None and call.op == "conv2d_acc" and call.args[1].name in partial:
                chans = partial[call.args[1].name]
                saved[call.args[0]] = emit_kernel(bb, te_backward.gather_channels, (call.args[0],), "gather_channels", call.node,
                                                  {"channels": list(chans)}, (chans,))
        return final.fields[0], new_values


def _rebind(bb, binding, value) -> None:
    """Bind the original var to a replacement so later bindings that read it stay valid."""
    bb.emit_normalized(relax.VarBinding(binding.var, value))


def _channel_count(mod, calls, weight_name) -> int:
    """Channels a ratio counts for a weight: input channels, or output channels for depthwise."""
    for c in calls:
        if c is not None and c.op == "conv2d_acc" and c.args[1].name == weight_name:
            return shape_of(c.args[1])[0] if c.attrs["groups"] > 1 else shape_of(c.args[1])[1]
    raise TinyTrainError(f"SparseUpdate: weight {weight_name!r} is not read by any conv")


def _bias_of(calls, conv_call):
    """The bias parameter of a conv: the second argument of the clamp kernel reading its accumulator."""
    for c in calls:
        if c is not None and c.op == "requantize" and c.args[0].same_as(conv_call.var):
            return c.args[1]
    raise TinyTrainError(f"SparseUpdate: node {conv_call.node!r}: no requantize follows the conv")


def _relax_functions(mod) -> list[str]:
    return [gv.name_hint for gv in mod.get_global_vars() if isinstance(mod[gv], relax.Function)]
