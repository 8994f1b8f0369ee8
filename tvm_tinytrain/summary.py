"""Per-layer facts of a model: what ``tinytrain inspect`` reports."""

from __future__ import annotations

import numpy as np

from .model import DTYPE_BYTES, Conv2D, Linear, Model


def tensor_bytes(model: Model, name: str) -> int:
    info = model.tensors[name]
    return int(np.prod(info.shape)) * DTYPE_BYTES[info.dtype]


def layer_rows(model: Model) -> list[dict]:
    """One dict per node: type, shapes, kernel, stride, MACs, params, activation bytes (inputs + output)."""
    rows = []
    conv_index = 0
    for node in model.nodes:
        row = {
            "name": node.name,
            "type": node.op,
            "inputs": [list(model.tensors[t].shape) for t in node.inputs],
            "output": list(model.tensors[node.output].shape),
            "kernel": None,
            "stride": None,
            "macs": model.node_macs(node),
            "params": model.node_params(node),
            "activation_bytes": sum(tensor_bytes(model, t) for t in node.inputs) + tensor_bytes(model, node.output),
        }
        if isinstance(node, Conv2D):
            row.update(type="depthwise_conv2d" if node.depthwise else "conv2d", kernel=node.kernel,
                       stride=node.stride, conv_index=conv_index)
            conv_index += 1
        elif isinstance(node, Linear):
            row.update(type="linear_float32" if node.is_float else "linear_int8")
        rows.append(row)
    return rows


def model_summary(model: Model) -> dict:
    rows = layer_rows(model)
    return {
        "model": model.name,
        "input": list(model.input_info.shape),
        "layers": rows,
        "totals": {
            "convs": len(model.convs()),
            "macs": sum(r["macs"] for r in rows),
            "params": sum(r["params"] for r in rows),
            "max_activation_bytes": max(r["activation_bytes"] for r in rows),
        },
    }
