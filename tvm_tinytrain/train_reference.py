"""Independent numpy reference of one int8 training step (forward, backward, QAS, SGD).

It walks the :class:`Model` directly, not the Relax graph, using the numpy
kernels of :mod:`.ops.reference` and :mod:`.ops.reference_backward`; the
compiled ``train_step`` must reproduce its updated weights bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import Add, Conv2D, GlobalAvgPool, Linear, Model
from .ops import reference as fwd
from .ops import reference_backward as bwd
from .relax_build import param_name
from .scheme import LayerUpdate


@dataclass
class StepResult:
    loss: float
    params: dict[str, np.ndarray]  # every updated parameter, by Relax parameter name
    grads: dict[str, np.ndarray]  # the gradient each update used (QAS-scaled for int8 parameters), same names


def qas_scales(x_scale: float, w_scales: np.ndarray, qas: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel (weight, bias) gradient scales: QAS (PAPER.md section 2) or plain."""
    ws = np.asarray(w_scales, np.float64)
    if qas:
        return (x_scale / ws).astype(np.float32), (1.0 / (x_scale * ws)).astype(np.float32)
    return (x_scale * ws).astype(np.float32), (x_scale * ws).astype(np.float32)


def train_step(model: Model, head_w: np.ndarray, head_b: np.ndarray, x: np.ndarray, label: np.ndarray, lr: float,
               updates: list[LayerUpdate], qas: bool = True) -> StepResult:
    """One SGD step of the int8 body (per ``updates``) and the float32 head on a batch ``x``."""
    lr_t = np.array([lr], np.float32)
    values = {model.input: x}
    masks = {}
    for node in model.nodes[:-1]:
        values[node.output] = fwd.run_node(model, node, values)
        if isinstance(node, (Conv2D, Add)):
            masks[node.output] = bwd.clamp_mask(values[node.output], node.qmin, node.qmax)
    head = model.nodes[-1]
    if not isinstance(head, Linear):
        raise TypeError("the model must end in a classifier")
    pq = model.tensors[head.input].quant
    logits = fwd.linear_float(values[head.input], pq.zero_point, pq.scale, head_w, head_b)
    loss, g_logits = bwd.softmax_cross_entropy(logits, label)

    new, grads = {}, {}
    g_x, g_w, g_b = bwd.linear_float_grads(values[head.input], pq.zero_point, pq.scale, head_w, g_logits)
    grads["classifier_weight"], grads["classifier_bias"] = g_w, g_b
    new["classifier_weight"] = bwd.sgd_update_f32(head_w, g_w, lr_t)
    new["classifier_bias"] = bwd.sgd_update_f32(head_b, g_b, lr_t)
    adjoint = {head.input: g_x}
    by_node = {u.node: u for u in updates}

    def accumulate(tensor, grad):
        adjoint[tensor] = bwd.add_f32(adjoint[tensor], grad) if tensor in adjoint else grad

    for node in reversed(model.nodes[:-1]):
        g = adjoint.get(node.output)
        if g is None:
            continue
        if isinstance(node, GlobalAvgPool):
            _, _, h, w = values[node.input].shape
            accumulate(node.input, bwd.global_avg_pool_grad(g, h, w))
        elif isinstance(node, Add):
            gm = bwd.apply_mask(g, masks[node.output])
            accumulate(node.lhs, gm)
            accumulate(node.rhs, gm)
        elif isinstance(node, Conv2D):
            g_acc = bwd.apply_mask(g, masks[node.output])
            xq = model.tensors[node.input].quant
            w_scale, b_scale = qas_scales(xq.scale, node.weight_scales, qas)
            up = by_node[node.name]
            if up.bias:
                name = param_name(node.name, "bias")
                grads[name] = bwd.bias_grad(g_acc, b_scale)
                new[name] = bwd.sgd_update_int32(node.bias, grads[name], lr_t)
            if up.channels is not None:
                name = param_name(node.name, "weight")
                new[name], grads[name] = _weight_update(node, values[node.input], g_acc, w_scale, up.channels, lr_t, xq.zero_point)
            if node.input != model.input:
                accumulate(node.input, bwd.conv2d_input_grad(g_acc, node.weight, node.weight_scales, values[node.input].shape,
                                                             node.stride, node.groups))
    return StepResult(float(loss[0]), new, grads)


def _weight_update(node: Conv2D, x, g_acc, scale, channels, lr_t, x_zero) -> tuple[np.ndarray, np.ndarray]:
    """(updated weight, the gradient of its trained channels)."""
    full = node.out_channels if node.depthwise else node.in_channels
    partial = len(channels) < full
    chans = tuple(channels) if partial else tuple(range(full))
    x_sel = bwd.gather_channels(x, chans) if partial else x
    if node.depthwise:
        g_w = bwd.conv2d_weight_grad(x_sel, g_acc, x_zero, node.stride, node.kernel, scale[list(chans)], chans)
    else:
        g_w = bwd.conv2d_weight_grad(x_sel, g_acc, x_zero, node.stride, node.kernel, scale)
    axis = 0 if node.depthwise else 1
    return bwd.sgd_update_int8(node.weight, g_w, lr_t, axis if partial else None, chans if partial else None), g_w
