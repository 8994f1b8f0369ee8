"""Numpy reference of the backward kernels, bit-exact to :mod:`.te_backward`.

Written from the operator semantics, in ``np.float32`` throughout.  Where the
order of a float reduction matters, the reference loops over the reduction
indices in the kernel's order (outer -> inner), vectorised over the output
indices, and adds every term the kernel adds (including its ``0.0f`` terms),
so the rounding is identical.  numpy's own ``sum`` (pairwise) is never used
on floats.
"""

from __future__ import annotations

import numpy as np

from ..quant import INT32_MAX, INT32_MIN
from .te_backward import EXP_LN2_HI, EXP_LN2_LO, EXP_LOG2E, EXP_POLY, EXP_X_MAX, EXP_X_MIN

F32 = np.float32


def clamp_mask(y: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """LSB-first packed bits of ``qmin < y < qmax``."""
    return np.packbits(((y > qmin) & (y < qmax)).ravel(), bitorder="little")


def unpack_mask(mask: np.ndarray, shape) -> np.ndarray:
    """Boolean array of ``shape`` from a packed mask."""
    size = int(np.prod(shape))
    return np.unpackbits(mask, bitorder="little")[:size].reshape(shape).astype(bool)


def apply_mask(g: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(unpack_mask(mask, g.shape), g, F32(0)).astype(F32)


def _where(valid, value):
    """The kernels' ``if_then_else(valid, value, 0.0f)``."""
    return np.where(valid, value, F32(0))


def _ordered_sum(terms):
    """``0.0f + t0 + t1 + ...`` in float32, in the given order."""
    acc = None
    for t in terms:
        acc = F32(0) + t if acc is None else acc + t
    return acc


def _transposed_taps(size: int, out_size: int, offset: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """For input positions ``0..size-1`` and one kernel tap: the output index ``(pos + offset) / stride`` and its validity."""
    t = np.arange(size) + offset
    valid = (t >= 0) & (t % stride == 0) & (t // stride < out_size)
    return np.clip(t // stride, 0, out_size - 1), valid


def conv2d_input_grad(g_acc: np.ndarray, w: np.ndarray, w_scales: np.ndarray, in_shape, stride: int, groups: int) -> np.ndarray:
    """Reduction order (o within the group, kh, kw), vectorised over (n, c, h, w)."""
    n, c, h, wd = in_shape
    o, cg, k, _ = w.shape
    ho, wo = g_acc.shape[2:]
    pad = (k - 1) // 2
    og = o // groups
    ci = np.arange(c)

    def terms():
        for ro in range(og):
            oc = (ci // cg) * og + ro
            for kh in range(k):
                oh, vh = _transposed_taps(h, ho, pad - kh, stride)
                for kw in range(k):
                    ow, vw = _transposed_taps(wd, wo, pad - kw, stride)
                    w_real = w[oc, ci % cg, kh, kw].astype(F32) * w_scales[oc]
                    term = g_acc[:, oc][:, :, oh[:, None], ow[None, :]] * w_real[None, :, None, None]
                    yield _where((vh[:, None] & vw[None, :])[None, None], term)

    return _ordered_sum(terms())


def gather_channels(x: np.ndarray, channels) -> np.ndarray:
    return x[:, list(channels)]


def merge_channels(frozen: np.ndarray, trained: np.ndarray, channel_axis: int, channels) -> np.ndarray:
    merged = frozen.copy()
    index = [slice(None)] * frozen.ndim
    index[channel_axis] = list(channels)
    merged[tuple(index)] = trained
    return merged


def conv2d_weight_grad(x_sel: np.ndarray, g_acc: np.ndarray, x_zero: int, stride: int, kernel: int, scale: np.ndarray,
                       depthwise_channels=None) -> np.ndarray:
    """Reduction order (n, ho, wo), vectorised over the (row, col, kh, kw) output; padding terms are ``0.0f``."""
    n, cs, h, wd = x_sel.shape
    ho, wo = g_acc.shape[2:]
    pad = (kernel - 1) // 2
    widths = ((0, 0), (0, 0), (pad, pad), (pad, pad))
    xf = np.pad((x_sel.astype(np.int32) - x_zero).astype(F32), widths)
    inside = np.pad(np.ones(x_sel.shape, bool), widths)
    g_rows = g_acc if depthwise_channels is None else g_acc[:, list(depthwise_channels)]

    def terms():
        for b in range(n):
            for i in range(ho):
                for j in range(wo):
                    win = (b, slice(None), slice(i * stride, i * stride + kernel), slice(j * stride, j * stride + kernel))
                    gv = g_rows[b, :, i, j, None, None, None]
                    if depthwise_channels is None:  # (O, 1, 1, 1) x (1, Cs, k, k)
                        yield _where(inside[win][None], gv * xf[win][None])
                    else:  # (Cs, 1, 1, 1) x (Cs, 1, k, k): row j pairs g channel ch[j] with x_sel channel j
                        yield _where(inside[win][:, None], gv * xf[win][:, None])

    return scale.astype(F32)[:, None, None, None] * _ordered_sum(terms())


def bias_grad(g_acc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    n, _, h, wd = g_acc.shape
    return scale.astype(F32) * _ordered_sum(g_acc[b, :, i, j] for b in range(n) for i in range(h) for j in range(wd))


def _sgd_step(lr: np.ndarray, grad: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``floor(0.5f - lr*G)`` clamped to ``[lo, hi]`` in float32 (an overflow of lr*G to +-inf is clamped too)."""
    with np.errstate(over="ignore"):
        return np.clip(np.floor(F32(0.5) - F32(lr[0]) * grad), F32(lo), F32(hi))


def sgd_update_int8(w: np.ndarray, grad: np.ndarray, lr: np.ndarray, channel_axis: int | None = None, channels=None) -> np.ndarray:
    out = w.copy()
    sel = (slice(None),) * channel_axis + (list(channels),) if channels is not None else ...
    step = _sgd_step(lr, grad, -256.0, 256.0).astype(np.int32)
    out[sel] = np.clip(w[sel].astype(np.int32) + step, -128, 127).astype(np.int8)
    return out


def sgd_update_int32(b: np.ndarray, grad: np.ndarray, lr: np.ndarray) -> np.ndarray:
    step = _sgd_step(lr, grad, -2.0**32, 2.0**32).astype(np.int64)  # any bias moved past a limit saturates there
    return np.clip(b.astype(np.int64) + step, INT32_MIN, INT32_MAX).astype(np.int32)


def sgd_update_f32(w: np.ndarray, grad: np.ndarray, lr: np.ndarray) -> np.ndarray:
    return w - F32(lr[0]) * grad


def add_f32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def global_avg_pool_grad(g: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.broadcast_to((g / F32(h * w))[:, :, None, None], (*g.shape, h, w)).copy()


def _dequantize(x: np.ndarray, x_zero: int, x_scale: float) -> np.ndarray:
    """float32 ``(float(x) - x_zero) * x_scale``, as :func:`te_kernels.dequantize_f32`."""
    return (x.astype(F32) - F32(x_zero)) * F32(x_scale)


def linear_float_grads(x: np.ndarray, x_zero: int, x_scale: float, w: np.ndarray, g: np.ndarray):
    x_real = _dequantize(x, x_zero, x_scale)
    n, o = g.shape
    g_x = _ordered_sum(g[:, oc, None] * w[None, oc, :] for oc in range(o))
    g_w = _ordered_sum(g[b, :, None] * x_real[None, b, :] for b in range(n))
    g_b = _ordered_sum(g[b] for b in range(n))
    return g_x, g_w, g_b


def exp_f32(x: np.ndarray) -> np.ndarray:
    """The float32 operation sequence of :func:`te_backward.exp_f32`."""
    x = np.clip(np.asarray(x, F32), F32(EXP_X_MIN), F32(EXP_X_MAX))
    n = np.floor(x * F32(EXP_LOG2E) + F32(0.5))
    r = (x - n * F32(EXP_LN2_HI)) - n * F32(EXP_LN2_LO)
    poly = np.full_like(r, EXP_POLY[0])
    for coeff in EXP_POLY[1:]:
        poly = poly * r + F32(coeff)
    p = poly * (r * r) + r + F32(1.0)
    two_n = np.left_shift(n.astype(np.int32) + 127, 23).view(F32)
    return p * two_n


def softmax_cross_entropy(logits: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(loss (1,), g (N, K))``; the loss is computed in float64 (the kernel's ``log`` is not bit-exact)."""
    n, k = logits.shape
    m = logits.max(axis=1)
    e = exp_f32(logits - m[:, None])
    s = _ordered_sum(e[:, c] for c in range(k))
    onehot = (np.arange(k)[None, :] == label[:, None]).astype(F32)
    g = (e / s[:, None] - onehot) / F32(n)
    loss = np.mean(np.log(s.astype(np.float64)) + m - logits[np.arange(n), label])
    return np.array([loss], F32), g
