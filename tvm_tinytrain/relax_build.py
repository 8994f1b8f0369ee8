"""Model -> Relax IRModule: a real int8 graph of ``call_tir`` kernels.

``main(input, *params)`` takes the int8 NCHW image first (``num_input = 1``)
and then every weight and bias as a parameter, so TVM's
``relax.transform.BindParams`` can bake them in for inference while the
training passes keep the trainable ones as inputs.  The fixed-point
multipliers and shifts are constants (they never change on the device).

Before (model)::

    Conv2D first_conv(input) -> first_conv ... Linear classifier(pool) -> logits

After::

    @R.function
    def main(input: R.Tensor((1, 3, 128, 128), "int8"), first_conv_weight: ..., ...):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            lv = R.call_tir(cls.conv2d_acc, (input, first_conv_weight), R.Tensor((1, 16, 64, 64), "int32"))
            lv1 = R.call_tir(cls.requantize, (lv, first_conv_bias, c0, c1), R.Tensor((1, 16, 64, 64), "int8"))
            ...
"""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax

from .model import Add, Conv2D, GlobalAvgPool, Linear, Model
from .ops import te_kernels
from .ops.constants import add_requant, conv_requant, input_zero, pool_requant


def param_name(node_name: str, field: str) -> str:
    """Relax parameter name of a node's weight/bias (``blocks[3].depthwise`` -> ``blocks_3_depthwise_weight``)."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", f"{node_name}.{field}").strip("_")


def model_params(model: Model) -> dict[str, np.ndarray]:
    """Weights and biases in the order of ``main``'s parameters after the input."""
    params = {}
    for node in model.nodes:
        if isinstance(node, (Conv2D, Linear)):
            params[param_name(node.name, "weight")] = node.weight
            params[param_name(node.name, "bias")] = node.bias
    return params


def _tensor_type(shape, dtype):
    return relax.TensorType([int(d) for d in shape], dtype)


def build_relax(model: Model, batch: int = 1) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Return ``(IRModule with main, params)`` for int8 inference of ``model``."""
    params = model_params(model)
    inp = model.input_info
    x = relax.Var("input", _tensor_type((batch, *inp.shape), "int8"))
    pvars = {k: relax.Var(k, _tensor_type(v.shape, str(v.dtype))) for k, v in params.items()}
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *pvars.values()], attrs={"num_input": 1}):
        with bb.dataflow():
            values = {model.input: x}
            for node in model.nodes:
                values[node.output] = _emit_node(bb, model, node, values, pvars)
            out = bb.emit_output(values[model.output])
        bb.emit_func_output(out)
    return bb.get(), params


def _const(arr: np.ndarray) -> relax.Constant:
    return relax.const(np.ascontiguousarray(arr))


def _emit_node(bb, model: Model, node, values, pvars):
    if isinstance(node, Conv2D):
        acc = bb.emit_te(te_kernels.conv2d_acc, values[node.input], pvars[param_name(node.name, "weight")],
                         input_zero(model, node), node.stride, node.groups, primfunc_name_hint="conv2d_acc")
        return _emit_requant(bb, model, node, acc, pvars)
    if isinstance(node, Linear):
        w, b = pvars[param_name(node.name, "weight")], pvars[param_name(node.name, "bias")]
        if node.is_float:
            q = model.tensors[node.input].quant
            return bb.emit_te(te_kernels.linear_float, values[node.input], w, b, q.zero_point, q.scale, primfunc_name_hint="linear_float")
        acc = bb.emit_te(te_kernels.linear_acc, values[node.input], w, input_zero(model, node), primfunc_name_hint="linear_acc")
        return _emit_requant(bb, model, node, acc, pvars)
    if isinstance(node, Add):
        p = add_requant(model, node)
        return bb.emit_te(te_kernels.add, values[node.lhs], values[node.rhs], p.a_zero, p.b_zero, p.a_mult, p.b_mult,
                          p.shift, p.y_zero, p.qmin, p.qmax, primfunc_name_hint="add_int8")
    if isinstance(node, GlobalAvgPool):
        rq = pool_requant(model, node)
        return bb.emit_te(te_kernels.global_avg_pool, values[node.input], input_zero(model, node), int(rq.mult[0]),
                          int(rq.shift[0]), rq.y_zero, primfunc_name_hint="global_avg_pool")
    raise TypeError(f"node {node.name!r}: no Relax lowering for {type(node).__name__}")


def _emit_requant(bb, model, node, acc, pvars):
    rq = conv_requant(model, node)
    return bb.emit_te(te_kernels.requantize, acc, pvars[param_name(node.name, "bias")], _const(rq.mult), _const(rq.shift),
                      rq.y_zero, rq.qmin, rq.qmax, primfunc_name_hint="requantize")
