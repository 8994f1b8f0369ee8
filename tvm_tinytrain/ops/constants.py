"""Per-node integer constants of the canonical requantization.

These are the model's quantization parameters in the form the kernels use;
the numpy reference and the TVM kernels both read them from here so that a
model means the same integers everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import Add, Conv2D, GlobalAvgPool, Linear, Model
from ..quant import add_multipliers, quantize_multipliers


@dataclass(frozen=True)
class Requant:
    """``y = clamp(rshift_round(sat32(acc + bias) * mult, shift) + y_zero, qmin, qmax)``."""

    mult: np.ndarray  # int32 (C,)
    shift: np.ndarray  # int32 (C,)
    y_zero: int
    qmin: int
    qmax: int


@dataclass(frozen=True)
class AddRequant:
    a_zero: int
    b_zero: int
    a_mult: int
    b_mult: int
    shift: int
    y_zero: int
    qmin: int
    qmax: int


def conv_requant(model: Model, node: Conv2D | Linear) -> Requant:
    """Rescale ``x_scale * w_scale[o] / y_scale`` of a conv or int8 classifier."""
    xq = model.tensors[node.input].quant
    yq = model.tensors[node.output].quant
    rescale = xq.scale * node.weight_scales.astype(np.float64) / yq.scale
    mult, shift = quantize_multipliers(rescale, f"node {node.name!r} rescale")
    return Requant(mult, shift, yq.zero_point, node.qmin, node.qmax)


def pool_requant(model: Model, node: GlobalAvgPool) -> Requant:
    """Mean = sum / (H*W), folded with any change of scale into one rescale."""
    xi = model.tensors[node.input]
    yq = model.tensors[node.output].quant
    hw = xi.shape[1] * xi.shape[2]
    mult, shift = quantize_multipliers([xi.quant.scale / (hw * yq.scale)], f"node {node.name!r} rescale")
    return Requant(mult, shift, yq.zero_point, -128, 127)


def add_requant(model: Model, node: Add) -> AddRequant:
    aq, bq, yq = (model.tensors[t].quant for t in (node.lhs, node.rhs, node.output))
    ma, mb, shift = add_multipliers(aq.scale, bq.scale, yq.scale, f"node {node.name!r}")
    return AddRequant(aq.zero_point, bq.zero_point, ma, mb, shift, yq.zero_point, node.qmin, node.qmax)


def input_zero(model: Model, node: Conv2D | Linear | GlobalAvgPool) -> int:
    return int(model.tensors[node.input].quant.zero_point)
