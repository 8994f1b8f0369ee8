"""The backward (training) kernels as TVM tensor expressions, one TIR PrimFunc each.

Gradients are float32 and flow through the real-valued quantities
``scale * (q - zero)``; the int8 weights and int32 biases are then updated
by a rounded, saturating SGD step (``../shared/PAPER.md`` section 2).

Every kernel is deterministic bit for bit: each float reduction accumulates
sequentially in the order of its reduce axes (listed outer -> inner) starting
from ``0.0f``, and no kernel calls a libm function whose result could differ
between platforms (softmax uses :func:`exp_f32`, built from ``+ - *`` and
``floor``).  :mod:`.reference_backward` repeats exactly these float32
operations in numpy.  The bit-exactness holds on targets that do not contract
``a*b + c`` into a fused multiply-add: TVM's LLVM backend allows contraction,
so it holds for the plain ``llvm`` target (generic x86-64, no FMA) but not for
an FMA-capable ``mcpu``; generated C must be compiled with
``-ffp-contract=off``.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import te, tirx

from ..errors import TinyTrainError
from ..quant import INT32_MAX, INT32_MIN
from . import te_kernels
from .schedule import MERGE_POSITION, STAGE_AT, TILE_AXIS

F32 = "float32"

# exp_f32: exp(x) = 2**n * exp(r), n = floor(x*log2(e) + 1/2), r = x - n*ln2 in [-ln2/2, ln2/2].
# ln2 = EXP_LN2_HI + EXP_LN2_LO (Cody-Waite): EXP_LN2_HI has 9 significant bits, so n*EXP_LN2_HI is exact for |n| < 2**15.
# exp(r) ~= 1 + r + r*r * (1/2! + r/3! + ... + r**5/7!): Taylor to degree 7, truncation < 0.1 ulp on the interval.
# Every constant is rounded to float32 here, once, so that TIR and numpy read the same bits.
EXP_X_MIN, EXP_X_MAX = -87.0, 0.0  # exp(-87) ~ 1.6e-38 is still a normal float32; softmax arguments are <= 0
EXP_LOG2E = float(np.float32(1.0 / math.log(2.0)))
EXP_LN2_HI = 0.693359375
EXP_LN2_LO = float(np.float32(math.log(2.0) - EXP_LN2_HI))
EXP_POLY = tuple(float(np.float32(1.0 / math.factorial(d))) for d in range(7, 1, -1))  # 1/7! ... 1/2!, highest degree first


def _f32(value: float):
    return tirx.const(value, F32)


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def _flatten(idx, shape):
    """Row-major flat index of ``idx`` in ``shape`` (the bit position in a packed mask)."""
    flat = idx[0]
    for i, d in zip(idx[1:], shape[1:]):
        flat = flat * int(d) + i
    return flat


def _unflatten(flat, shape) -> tuple:
    """Inverse of :func:`_flatten`."""
    idx = []
    for d in reversed(shape[1:]):
        idx.append(flat % int(d))
        flat = flat // int(d)
    return (flat, *reversed(idx))


def static_index(i, values, first: int = 0):
    """``values[i - first]`` for a compile-time tuple of ints and ``first <= i < first + len(values)``.

    Runs that are arithmetic progressions (including constant runs) become affine expressions; the rest is
    a balanced tree of lazy ``if_then_else`` on ``i``, so one lookup costs O(log len) comparisons (the
    "all channels" case stays plain strided indexing).
    """
    values = [int(v) for v in values]
    step = values[1] - values[0] if len(values) > 1 else 0
    if all(b - a == step for a, b in zip(values, values[1:])):
        return values[0] + (i - first) * step
    mid = len(values) // 2
    return tirx.if_then_else(i < first + mid, static_index(i, values[:mid], first), static_index(i, values[mid:], first + mid))


# ---------------------------------------------------------------- masks of the clamp
def _packed_mask(shape, unsaturated) -> te.Tensor:
    """uint8 ``mask[i//8] bit i%8`` (LSB first) = ``unsaturated(idx)`` for flat index ``i``; bits past the end are 0."""
    numel = _numel(shape)
    bit = te.reduce_axis((0, 8), "bit")
    bit_or = te.comm_reducer(lambda a, b: a | b, lambda dtype: tirx.const(0, dtype), name="bit_or")

    def body(byte):
        flat = byte * 8 + bit
        zero = tirx.const(0, "uint8")
        value = tirx.Select(unsaturated(_unflatten(flat, shape)), tirx.shift_left(tirx.const(1, "uint8"), bit.var.astype("uint8")), zero)
        return bit_or(tirx.if_then_else(flat < numel, value, zero), axis=bit)  # lazy: never reads past the inputs

    return te.compute(((numel + 7) // 8,), body, name="mask")


def clamp_mask(y: te.Tensor, qmin: int, qmax: int) -> te.Tensor:
    """Packed 1-bit mask of the clamp's gradient: 1 where ``qmin < y < qmax`` (the output is unsaturated).

    It reads the int8 output, not the pre-clamp value, so the clamping kernel
    stays unchanged (and fusable with its conv) and the mask costs nothing
    when no gradient crosses the layer.  An output exactly on a bound counts as
    saturated, as for the float mode's clip (PyTorch's hardtanh convention).
    """
    return _packed_mask(y.shape, lambda idx: tirx.all(y[idx] > qmin, y[idx] < qmax))


def apply_mask(g: te.Tensor, mask: te.Tensor) -> te.Tensor:
    """``g`` where the mask bit is 1, ``0.0f`` where it is 0 (a select, so inf/NaN in masked-out ``g`` vanish)."""

    def body(*idx):
        flat = _flatten(idx, g.shape)
        bit = tirx.bitwise_and(tirx.shift_right(mask[flat // 8], (flat % 8).astype("uint8")), tirx.const(1, "uint8"))
        return tirx.Select(bit != 0, g[idx], _f32(0.0))

    return te.compute(g.shape, body, name="masked")


# ---------------------------------------------------------------- convolution
def _conv_pad(h: int, w: int, k: int, stride: int, ho: int, wo: int) -> int:
    """The forward conv's padding ``(k-1)//2``, after checking that (h, w) -> (ho, wo) is that conv's shape."""
    pad = (k - 1) // 2
    if ((h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1) != (ho, wo):
        raise TinyTrainError(f"conv gradient: input {h}x{w} with kernel {k}, stride {stride} gives no {ho}x{wo} output")
    return pad


def conv2d_input_grad(g_acc: te.Tensor, w: te.Tensor, w_scales: te.Tensor, in_shape, stride: int, groups: int) -> te.Tensor:
    """float32 gradient w.r.t. the real conv input: the transposed conv of ``g_acc`` with the real weights.

    ``g_x[n,c,h,w] = sum_{o in c's group, kh, kw} g_acc[n,o,ho,wo] * (float(w[o,c',kh,kw]) * w_scales[o])``
    over the terms where ``ho = (h + pad - kh) / stride`` (and ``wo``) is an integer inside the output;
    the reduction runs over the group's ``O/groups`` outputs only, so depthwise costs ``k*k`` per element.
    With a stride it runs over the taps of the one parity that can be exact, ``kh = (h + pad) % stride +
    stride * j``: the same terms in the same order, without the ``stride**2 - 1`` of every ``stride**2`` taps
    that add nothing.
    """
    n, c, h, wd = (int(d) for d in in_shape)
    o, cg, k, _ = (int(d) for d in w.shape)
    ho, wo = (int(d) for d in g_acc.shape[2:])
    pad = _conv_pad(h, wd, k, stride, ho, wo)
    og = o // groups
    taps = -(-k // stride)
    ro = te.reduce_axis((0, og), "ro")
    rh = te.reduce_axis((0, taps), "rh")
    rw = te.reduce_axis((0, taps), "rw")

    # The real weights: inlined by the reference schedule; the optimized one computes those of a tile of input
    # channels once per tile (the loop at index 1 of g_x: its channels, or their tiles).
    w_real = te.compute(w.shape, lambda *idx: w[idx].astype(F32) * w_scales[idx[0]], name="w_real", attrs={STAGE_AT: 1})

    def body(b, ci, ih, iw):
        oc = (ci // cg) * og + ro
        kh, kw = (ih + pad) % stride + rh * stride, (iw + pad) % stride + rw * stride
        th, tw = ih + pad - kh, iw + pad - kw
        oh, ow = th // stride, tw // stride
        valid = tirx.all(kh < k, kw < k, th >= 0, tw >= 0, oh < ho, ow < wo)
        return te.sum(tirx.if_then_else(valid, g_acc[b, oc, oh, ow] * w_real[oc, ci % cg, kh, kw], _f32(0.0)), axis=[ro, rh, rw])

    return te.compute((n, c, h, wd), body, name="g_x")


def conv2d_weight_grad(x_sel: te.Tensor, g_acc: te.Tensor, x_zero: int, stride: int, kernel: int, scale: te.Tensor,
                       depthwise_channels: tuple[int, ...] | None = None) -> te.Tensor:
    """float32 (scaled) weight gradient of the selected channels only, ``G = scale[row] * S``.

    ``S[o,j,kh,kw] = sum_{n,ho,wo} g_acc[n,o,ho,wo] * float(x_sel[n,j,ih,iw] - x_zero)`` (0 in the padding),
    shape (O, Cs, k, k).  Depthwise: ``S[j,0,kh,kw]`` pairs ``x_sel[:, j]`` with ``g_acc[:, depthwise_channels[j]]``,
    shape (Cs, 1, k, k).  The selection is of input channels for groups 1 and of channels for depthwise, as in
    the paper's sparse update; only those input channels need saving from the forward.  ``scale`` has one entry
    per row; with ``x_scale / w_scale[o]`` it yields the paper's QAS-scaled int8 weight gradient.
    """
    s = _weight_grad_sum(x_sel, g_acc, x_zero, stride, kernel, depthwise_channels)
    return te.compute(s.shape, lambda row, *rest: scale[row] * s[(row, *rest)], name="wgrad")


def _weight_grad_sum(x_sel: te.Tensor, g_acc: te.Tensor, x_zero: int, stride: int, kernel: int,
                     depthwise_channels: tuple[int, ...] | None) -> te.Tensor:
    n, cs, h, wd = (int(d) for d in x_sel.shape)
    o, ho, wo = (int(d) for d in g_acc.shape[1:])
    pad = _conv_pad(h, wd, kernel, stride, ho, wo)
    rn = te.reduce_axis((0, n), "rn")
    rh = te.reduce_axis((0, ho), "rh")
    rw = te.reduce_axis((0, wo), "rw")

    def body(row, col, kh, kw):
        g_ch, x_ch = (row, col) if depthwise_channels is None else (static_index(row, depthwise_channels), row)
        ih, iw = rh * stride + kh - pad, rw * stride + kw - pad
        inside = tirx.all(ih >= 0, ih < h, iw >= 0, iw < wd)
        xv = (x_sel[rn, x_ch, ih, iw].astype("int32") - x_zero).astype(F32)
        return te.sum(tirx.if_then_else(inside, g_acc[rn, g_ch, rh, rw] * xv, _f32(0.0)), axis=[rn, rh, rw])

    shape = (o, cs, kernel, kernel) if depthwise_channels is None else (cs, 1, kernel, kernel)
    # Tiled along the rows first: a row's operand is a float32 load, a column's an int8 load and conversion.
    return te.compute(shape, body, name="wgrad_sum", attrs={TILE_AXIS: 0})


def conv2d_weight_grad_sgd(w: te.Tensor, x_sel: te.Tensor, g_acc: te.Tensor, scale: te.Tensor, lr: te.Tensor, x_zero: int,
                           stride: int, kernel: int, depthwise_channels: tuple[int, ...] | None = None) -> te.Tensor:
    """:func:`conv2d_weight_grad` and :func:`sgd_update_int8` of the same elements as one stage.

    ``w`` (shape of the gradient: the whole weight or its trained slice) gets its update as soon as each
    gradient element is summed, so under the compact schedule the float32 gradient tensor shrinks to one
    register.  Each output element reads only ``w`` at its own index, so the kernel may run in place.
    The float operations are those of the two kernels, in the same order: the bits are the same.
    """
    s = _weight_grad_sum(x_sel, g_acc, x_zero, stride, kernel, depthwise_channels)
    if tuple(s.shape) != tuple(w.shape):
        raise TinyTrainError(f"conv2d_weight_grad_sgd: gradient shape {tuple(s.shape)} does not match the weight's {tuple(w.shape)}")
    # One stage after the sum (not a separate scaled-gradient stage) so the schedule can put it inside the sum's loop.
    return te.compute(w.shape, lambda row, *rest: int8_step(w[(row, *rest)], lr, scale[row] * s[(row, *rest)]), name="w_new")


def bias_grad(g_acc: te.Tensor, scale: te.Tensor) -> te.Tensor:
    """``scale[o] * sum_{n,h,w} g_acc[n,o,h,w]``; with ``1/(x_scale*w_scale[o])`` the QAS-scaled int32 bias gradient."""
    n, o, h, wd = (int(d) for d in g_acc.shape)
    rn = te.reduce_axis((0, n), "rn")
    rh = te.reduce_axis((0, h), "rh")
    rw = te.reduce_axis((0, wd), "rw")
    s = te.compute((o,), lambda oc: te.sum(g_acc[rn, oc, rh, rw], axis=[rn, rh, rw]), name="bgrad_sum")
    return te.compute((o,), lambda oc: scale[oc] * s[oc], name="bgrad")


def masked_bias_grad(g: te.Tensor, mask: te.Tensor, scale: te.Tensor) -> te.Tensor:
    """:func:`bias_grad` of ``apply_mask(g, mask)`` as one kernel: the select is inlined into the sum (the same terms),
    so the masked copy is never stored, for a ``g`` that other kernels read unmasked (a residual's gradient)."""
    return bias_grad(apply_mask(g, mask), scale)


# ---------------------------------------------------------------- updates
def _sgd_step(lr: te.Tensor, g, lo: float, hi: float):
    """``floor(0.5f - lr*G)``: the round-half-up integer step ``-lr*G``, clamped in float so it always converts exactly."""
    return tirx.max(tirx.min(tirx.floor(_f32(0.5) - lr[0] * g), _f32(hi)), _f32(lo))


def int8_step(w, lr, g):
    """The new int8 weight after SGD step ``-lr * g`` (``lr`` a one-element tensor or buffer)."""
    return te_kernels.clamp_int8(w.astype("int32") + _sgd_step(lr, g, -256.0, 256.0).astype("int32"), -128, 127)


def sgd_update_int8(w: te.Tensor, grad: te.Tensor, lr: te.Tensor, channel_axis: int | None = None,
                    channels: tuple[int, ...] | None = None) -> te.Tensor:
    """``w' = saturate_int8(w + floor(0.5 - lr*G))``, the new int8 weight.

    With ``channels`` only those slices along ``channel_axis`` are updated (``grad`` holds them in that
    order, e.g. from :func:`conv2d_weight_grad`); every other element is copied unchanged.
    """
    if channels is None:
        return te.compute(w.shape, lambda *idx: int8_step(w[idx], lr, grad[idx]), name="w_new")
    size = int(w.shape[channel_axis])
    position = [-1] * size
    for j, ch in enumerate(channels):
        position[ch] = j

    def body(*idx):
        j = static_index(idx[channel_axis], position)
        g_idx = (*idx[:channel_axis], j, *idx[channel_axis + 1:])
        return tirx.if_then_else(j >= 0, int8_step(w[idx], lr, grad[g_idx]), w[idx])  # lazy: grad[-1] is never read

    return te.compute(w.shape, body, name="w_new")


STEP_BOUND_INT32 = float(2**32)


def int32_step(b, lr, g):
    """The new int32 bias after SGD step ``-lr * g`` (``lr`` a one-element tensor or buffer).  The step is clamped to
    ``+-2**32`` (exact in float32 and int64): far enough that any bias it moves past a limit saturates there."""
    step = _sgd_step(lr, g, -STEP_BOUND_INT32, STEP_BOUND_INT32).astype("int64")
    return tirx.max(tirx.min(b.astype("int64") + step, INT32_MAX), INT32_MIN).astype("int32")


def sgd_update_int32(b: te.Tensor, grad: te.Tensor, lr: te.Tensor) -> te.Tensor:
    """``b' = saturate_int32(b + floor(0.5 - lr*G))``."""
    return te.compute(b.shape, lambda *idx: int32_step(b[idx], lr, grad[idx]), name="b_new")


def sgd_update_f32(w: te.Tensor, grad: te.Tensor, lr: te.Tensor) -> te.Tensor:
    """Plain SGD of the float32 classifier: ``w - lr*G``."""
    return te.compute(w.shape, lambda *idx: w[idx] - lr[0] * grad[idx], name="w_new")


def add_f32(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """Elementwise ``a + b``: gradient accumulation over micro-batches."""
    return te.compute(a.shape, lambda *idx: a[idx] + b[idx], name="sum")


def gather_channels(x: te.Tensor, channels: tuple[int, ...]) -> te.Tensor:
    """``x[:, channels]``: the only part of a sparse-updated conv's input the weight gradient needs."""
    shape = (x.shape[0], len(channels), *x.shape[2:])
    return te.compute(shape, lambda b, j, *rest: x[(b, static_index(j, channels), *rest)], name="x_sel")


def merge_channels(frozen: te.Tensor, trained: te.Tensor, channel_axis: int, channels: tuple[int, ...]) -> te.Tensor:
    """The whole weight of a partially trained conv: ``trained`` (RAM) at ``channels``, ``frozen`` (flash) elsewhere.

    Only the trained slices have to live in RAM between steps; the merged weight
    is a temporary that each reader of the weight builds when it runs.  Which slice
    row a channel reads (or -1) is a small table stage, :data:`MERGE_POSITION`, that
    the schedules compute once per call: inlined, its compare tree would run at
    every weight read of the reduction.
    """
    position = [-1] * int(frozen.shape[channel_axis])
    for j, ch in enumerate(channels):
        position[ch] = j
    table = te.compute((len(position),), lambda c: static_index(c, position), name=MERGE_POSITION)

    def body(*idx):
        j = table[idx[channel_axis]]
        return tirx.if_then_else(j >= 0, trained[(*idx[:channel_axis], j, *idx[channel_axis + 1:])], frozen[idx])  # lazy

    return te.compute(frozen.shape, body, name="w_merged")


# ---------------------------------------------------------------- head
def global_avg_pool_grad(g: te.Tensor, h: int, w: int) -> te.Tensor:
    """(N, C) -> (N, C, H, W): each input pixel gets ``g / (H*W)`` of the mean's gradient."""
    n, c = g.shape
    return te.compute((n, c, h, w), lambda b, ch, i, j: g[b, ch] / _f32(float(h * w)), name="g_pool")


def linear_float_grads(x: te.Tensor, x_zero: int, x_scale: float, w: te.Tensor, g: te.Tensor) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """Gradients of the float classifier ``logits = x_real @ w.T + b``: ``(g_x (N,I), g_w (O,I), g_b (O,))``.

    ``x_real`` is :func:`te_kernels.dequantize_f32`, exactly as the forward computes it.
    """
    n, i = (int(d) for d in x.shape)
    o = int(w.shape[0])
    ro = te.reduce_axis((0, o), "ro")
    rn = te.reduce_axis((0, n), "rn")
    rb = te.reduce_axis((0, n), "rb")
    g_x = te.compute((n, i), lambda b, k: te.sum(g[b, ro] * w[ro, k], axis=ro), name="g_x")
    g_w = te.compute((o, i), lambda oc, k: te.sum(g[rn, oc] * te_kernels.dequantize_f32(x[rn, k], x_zero, x_scale), axis=rn), name="g_w")
    g_b = te.compute((o,), lambda oc: te.sum(g[rb, oc], axis=rb), name="g_b")
    return g_x, g_w, g_b


def exp_f32(x):
    """Deterministic float32 ``exp`` of a TIR expression on ``[EXP_X_MIN, EXP_X_MAX]`` (clamped), within 2 ulp.

    Built from ``+ - *``, ``floor`` and the exponent bits ``(n + 127) << 23`` so that the numpy reference
    and every compiled target produce the same bits (libm ``expf`` differs between platforms).
    """
    x = tirx.max(tirx.min(x, _f32(EXP_X_MAX)), _f32(EXP_X_MIN))
    n = tirx.floor(x * _f32(EXP_LOG2E) + _f32(0.5))
    r = (x - n * _f32(EXP_LN2_HI)) - n * _f32(EXP_LN2_LO)
    poly = _f32(EXP_POLY[0])
    for coeff in EXP_POLY[1:]:
        poly = poly * r + _f32(coeff)
    p = poly * (r * r) + r + _f32(1.0)
    two_n = tirx.reinterpret(F32, tirx.shift_left(n.astype("int32") + 127, 23))
    return p * two_n


def softmax_cross_entropy(logits: te.Tensor, label: te.Tensor) -> tuple[te.Tensor, te.Tensor]:
    """Mean softmax cross-entropy ``loss`` (shape (1,)) and its gradient ``(softmax - onehot) / N``.

    ``g`` is bit-exact (:func:`exp_f32`, sums in class order); the loss uses ``log`` and is only for reporting.
    Labels are read unchecked: the caller must ensure ``0 <= label < K`` (TIR cannot raise).
    """
    n, k = (int(d) for d in logits.shape)
    rk = te.reduce_axis((0, k), "rk")
    m = te.compute((n,), lambda b: te.max(logits[b, rk], axis=rk), name="max")
    rs = te.reduce_axis((0, k), "rs")
    s = te.compute((n,), lambda b: te.sum(exp_f32(logits[b, rs] - m[b]), axis=rs), name="sumexp")

    def grad(b, c):
        onehot = tirx.Select(c == label[b], _f32(1.0), _f32(0.0))
        return (exp_f32(logits[b, c] - m[b]) / s[b] - onehot) / _f32(float(n))

    g = te.compute((n, k), grad, name="g_logits")  # exp recomputed, not stored: K floats of RAM saved, same bits
    rn = te.reduce_axis((0, n), "rn")
    total = te.compute((1,), lambda _: te.sum(tirx.log(s[rn]) + (m[rn] - logits[rn, label[rn]]), axis=rn), name="loss_sum")
    loss = te.compute((1,), lambda i: total[i] / _f32(float(n)), name="loss")
    return loss, g
