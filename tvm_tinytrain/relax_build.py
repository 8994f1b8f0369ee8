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
from tvm import relax, te

from .model import Add, Conv2D, GlobalAvgPool, Linear, Model
from .ops import te_kernels
from .ops.constants import add_requant, conv_requant, pool_requant
from .ops.schedule import compact_schedule


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
    # The values travel with the module so passes that choose channels by weight magnitude need nothing else.
    init = {k: tvm.runtime.tensor(np.ascontiguousarray(v)) for k, v in params.items()}
    mod = bb.get().with_attr("tinytrain.param_init", init).with_attr("tinytrain.model_name", model.name)
    return mod, params


def _const(arr: np.ndarray) -> relax.Constant:
    return relax.const(np.ascontiguousarray(arr))


def kernel_attrs(op: str, node: str, **static) -> dict:
    """PrimFunc attributes that make a kernel call self-describing for the graph passes.

    ``tinytrain.op`` names the operator; the other ``tinytrain.*`` entries are
    the compile-time constants the passes need (zero points, real scales for
    the float backward, clamp bounds), so a pass reading the IRModule alone
    can derive gradients without the original :class:`Model`.
    """
    attrs = {"tinytrain.op": op, "tinytrain.node": node}
    for k, v in static.items():
        attrs[f"tinytrain.{k}"] = [float(x) for x in v] if isinstance(v, np.ndarray) else v
    return attrs


def emit_kernel(bb, te_fn, args, op: str, node: str, static: dict, te_args=()):
    """Emit ``call_tir`` of the PrimFunc built from ``te_fn(*args, *te_args)``, compacted and tagged with :func:`kernel_attrs`."""
    static = {k: v for k, v in static.items() if k not in ("op", "node")}  # when re-emitting decoded attrs
    placeholders = [te.placeholder([int(d) for d in a.ty.shape], str(a.ty.dtype), f"arg{i}") for i, a in enumerate(args)]
    outs = te_fn(*placeholders, *te_args)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    func = compact_schedule(te.create_prim_func([*placeholders, *outs])).without_attr("global_symbol")
    gv = bb.add_func(func.with_attrs(kernel_attrs(op, node, **static)), op)
    out_ty = [relax.TensorType([int(d) for d in o.shape], o.dtype) for o in outs]
    return bb.emit(relax.call_tir(gv, relax.Tuple(list(args)), out_ty if len(out_ty) > 1 else out_ty[0]))


def _emit_node(bb, model: Model, node, values, pvars):
    if isinstance(node, Conv2D):
        xq = model.tensors[node.input].quant
        acc = emit_kernel(bb, te_kernels.conv2d_acc, (values[node.input], pvars[param_name(node.name, "weight")]), "conv2d_acc", node.name,
                          {"x_zero": xq.zero_point, "x_scale": xq.scale, "w_scales": node.weight_scales, "stride": node.stride, "groups": node.groups},
                          (xq.zero_point, node.stride, node.groups))
        return _emit_requant(bb, model, node, acc, pvars)
    if isinstance(node, Linear):
        w, b = pvars[param_name(node.name, "weight")], pvars[param_name(node.name, "bias")]
        q = model.tensors[node.input].quant
        if node.is_float:
            return emit_kernel(bb, te_kernels.linear_float, (values[node.input], w, b), "linear_float", node.name,
                               {"x_zero": q.zero_point, "x_scale": q.scale}, (q.zero_point, q.scale))
        acc = emit_kernel(bb, te_kernels.linear_acc, (values[node.input], w), "linear_acc", node.name,
                          {"x_zero": q.zero_point, "x_scale": q.scale, "w_scales": node.weight_scales}, (q.zero_point,))
        return _emit_requant(bb, model, node, acc, pvars)
    if isinstance(node, Add):
        p = add_requant(model, node)
        scales = {k: model.tensors[t].quant.scale for k, t in (("a_scale", node.lhs), ("b_scale", node.rhs), ("y_scale", node.output))}
        return emit_kernel(bb, te_kernels.add, (values[node.lhs], values[node.rhs]), "add_int8", node.name,
                           {"a_zero": p.a_zero, "b_zero": p.b_zero, "a_mult": p.a_mult, "b_mult": p.b_mult, "shift": p.shift,
                            "y_zero": p.y_zero, "qmin": p.qmin, "qmax": p.qmax, **scales},
                           (p.a_zero, p.b_zero, p.a_mult, p.b_mult, p.shift, p.y_zero, p.qmin, p.qmax))
    if isinstance(node, GlobalAvgPool):
        rq = pool_requant(model, node)
        xq, yq = model.tensors[node.input].quant, model.tensors[node.output].quant
        return emit_kernel(bb, te_kernels.global_avg_pool, (values[node.input],), "global_avg_pool", node.name,
                           {"x_scale": xq.scale, "y_scale": yq.scale},
                           (xq.zero_point, int(rq.mult[0]), int(rq.shift[0]), rq.y_zero))
    raise TypeError(f"node {node.name!r}: no Relax lowering for {type(node).__name__}")


def _emit_requant(bb, model, node, acc, pvars):
    rq = conv_requant(model, node)
    yq = model.tensors[node.output].quant
    return emit_kernel(bb, te_kernels.requantize, (acc, pvars[param_name(node.name, "bias")], _const(rq.mult), _const(rq.shift)),
                       "requantize", node.name, {"y_zero": rq.y_zero, "y_scale": yq.scale, "qmin": rq.qmin, "qmax": rq.qmax},
                       (rq.y_zero, rq.qmin, rq.qmax))
