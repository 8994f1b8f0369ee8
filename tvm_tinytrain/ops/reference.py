"""Independent numpy reference of the int8 operators and of whole-model inference.

Written from the operator semantics (``../shared/PAPER.md`` section 1 and
:mod:`tvm_tinytrain.quant`), not from the TIR kernels: convs are im2col
matrix products in int64, rounding is Python-style floor division.  All arrays
carry a leading batch dimension N.
"""

from __future__ import annotations

import numpy as np

from ..model import Add, Conv2D, GlobalAvgPool, Linear, Model
from ..quant import INT32_MAX, INT32_MIN
from .constants import AddRequant, Requant, add_requant, conv_requant, input_zero, pool_requant


def rshift_round(v: np.ndarray, shift) -> np.ndarray:
    """``round(v / 2**shift)`` with halves rounded up (towards +inf), exact in int64."""
    v = np.asarray(v, dtype=np.int64)
    div = np.left_shift(np.int64(1), np.asarray(shift, dtype=np.int64))
    return np.floor_divide(v + div // 2, div)


def conv2d_acc(x: np.ndarray, w: np.ndarray, x_zero: int, stride: int, groups: int) -> np.ndarray:
    """int32 accumulator of ``conv(x - x_zero, w)`` with zero padding ``(k-1)//2``."""
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    pad = (k - 1) // 2
    xs = np.pad(x.astype(np.int64) - x_zero, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (h + 2 * pad - k) // stride + 1
    wo = (wd + 2 * pad - k) // stride + 1
    # patches[n, c, ho, wo, kh, kw]
    idx_h = (np.arange(ho) * stride)[:, None] + np.arange(k)[None, :]
    idx_w = (np.arange(wo) * stride)[:, None] + np.arange(k)[None, :]
    patches = xs[:, :, idx_h[:, None, :, None], idx_w[None, :, None, :]]
    og = o // groups
    out = np.empty((n, o, ho, wo), dtype=np.int64)
    for g in range(groups):
        p = patches[:, g * cg:(g + 1) * cg]
        wg = w[g * og:(g + 1) * og].astype(np.int64)
        out[:, g * og:(g + 1) * og] = np.einsum("nchwij,ocij->nohw", p, wg)
    assert out.min(initial=0) >= INT32_MIN and out.max(initial=0) <= INT32_MAX
    return out.astype(np.int32)


def requantize(acc: np.ndarray, bias: np.ndarray | None, rq: Requant) -> np.ndarray:
    """Per-channel (axis 1) requantization of an int32 accumulator to int8."""
    shape = (1, -1) + (1,) * (acc.ndim - 2)
    total = acc.astype(np.int64)
    if bias is not None:
        total = np.clip(total + bias.astype(np.int64).reshape(shape), INT32_MIN, INT32_MAX)
    y = rshift_round(total * rq.mult.astype(np.int64).reshape(shape), rq.shift.reshape(shape)) + rq.y_zero
    return np.clip(y, rq.qmin, rq.qmax).astype(np.int8)


def add(a: np.ndarray, b: np.ndarray, p: AddRequant) -> np.ndarray:
    total = (a.astype(np.int64) - p.a_zero) * p.a_mult + (b.astype(np.int64) - p.b_zero) * p.b_mult
    return np.clip(rshift_round(total, p.shift) + p.y_zero, p.qmin, p.qmax).astype(np.int8)


def global_avg_pool(x: np.ndarray, x_zero: int, rq: Requant) -> np.ndarray:
    total = (x.astype(np.int64) - x_zero).sum(axis=(2, 3))
    return requantize(total, None, rq)


def linear_acc(x: np.ndarray, w: np.ndarray, x_zero: int) -> np.ndarray:
    return ((x.astype(np.int64) - x_zero) @ w.astype(np.int64).T).astype(np.int32)


def linear_float(x: np.ndarray, x_zero: int, x_scale: float, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 logits: dequantize, sum the products over the inputs in order, then add the bias.

    The sum runs in the kernel's order (not BLAS's) so training can compare logits bit for bit.
    """
    xf = (x.astype(np.float32) - np.float32(x_zero)) * np.float32(x_scale)
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for k in range(x.shape[1]):
        acc = acc + xf[:, k, None] * w[None, :, k]
    return acc + b


def run_node(model: Model, node, values: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(node, Conv2D):
        acc = conv2d_acc(values[node.input], node.weight, input_zero(model, node), node.stride, node.groups)
        return requantize(acc, node.bias, conv_requant(model, node))
    if isinstance(node, Add):
        return add(values[node.lhs], values[node.rhs], add_requant(model, node))
    if isinstance(node, GlobalAvgPool):
        return global_avg_pool(values[node.input], input_zero(model, node), pool_requant(model, node))
    if isinstance(node, Linear):
        x = values[node.input]
        if node.is_float:
            q = model.tensors[node.input].quant
            return linear_float(x, q.zero_point, q.scale, node.weight, node.bias)
        return requantize(linear_acc(x, node.weight, input_zero(model, node)), node.bias, conv_requant(model, node))
    raise TypeError(f"no reference for {type(node).__name__}")


def run_model(model: Model, x: np.ndarray, keep: bool = False):
    """Whole-model int8 inference of a batch ``x`` (N, C, H, W) int8.

    Returns the output array, or with ``keep=True`` the dict of every tensor.
    """
    values = {model.input: np.asarray(x)}
    for node in model.nodes:
        values[node.output] = run_node(model, node, values)
    return values if keep else values[model.output]
