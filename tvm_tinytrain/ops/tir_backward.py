"""Backward kernels written directly in TIR, where a tensor-expression pipeline cannot express their loop order.

:func:`depthwise_block_backward` is the backward of a depthwise conv followed, going backwards, by the 1x1
expansion that feeds it (an inverted-residual block): the depthwise input gradient, the expansion's clamp
mask, its bias gradient and its input gradient.  As separate kernels the depthwise input gradient is a whole
float32 tensor (e.g. 96 KB at 96 channels of 16x16); here it exists one channel plane at a time, consumed at
once by the expansion's gradients.  Each output element sums the same float32 terms in the same order as the
separate kernels of :mod:`.te_backward` (the expansion's input gradient over expanded channels in increasing
order, starting from ``0.0f``), so the results are the same bits.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .te_backward import int8_step


def depthwise_block_backward(channels: int, in_channels: int, h: int, w: int, ho: int, wo: int, k: int, stride: int,
                             trained_x_zero: int | None = None):
    """PrimFunc ``(g, w_dw, s_dw, mask, b_scale, w_pw, s_pw) -> (g_x, g_b)`` for one depthwise conv of
    ``channels`` planes ``h x w -> ho x wo`` (kernel ``k``, ``stride``, padding ``(k-1)//2``) whose input is a 1x1 conv
    of ``in_channels``.  ``mask`` is the expansion's packed clamp mask; ``g_b = b_scale * sum(masked gradient)``
    per channel (:func:`.te_backward.bias_grad`), ``g_x`` the expansion's input gradient.

    With ``trained_x_zero`` (the zero point of the expansion's input) the expansion's weight is trained too:
    ``(w_pw, g, w_dw, s_dw, mask, b_scale, s_pw, x, w_scale, lr) -> (g_x, g_b, w_new)`` also applies its SGD step
    (:func:`.te_backward.conv2d_weight_grad_sgd` over input ``x``).  Its gradient row ``c`` needs masked plane ``c``
    only, so row ``c`` is updated as soon as that plane has added into ``g_x`` with the old row: ``w_new`` may be
    ``w_pw`` itself (in place, as the C step runs it).
    """
    pad = (k - 1) // 2
    mask_bytes = (channels * h * w + 7) // 8

    @T.macro
    def block_backward(g, w_dw, s_dw, mask, b_scale, w_pw, s_pw, x, w_scale, lr, g_x, g_b, w_new):
        plane = T.alloc_buffer((h, w), "float32", scope="global")
        wsum = T.alloc_buffer((1,), "float32", scope="global")
        for ci, y, xx in T.grid(in_channels, h, w):
            g_x[0, ci, y, xx] = T.float32(0.0)
        for c in range(channels):
            for y, xx in T.grid(h, w):  # the depthwise input gradient of channel c, masked by the expansion's clamp
                plane[y, xx] = T.float32(0.0)
                for rh, rw in T.grid(k, k):  # tap (rh, rw) reads output (y + pad - rh, x + pad - rw) / stride when that is exact
                    plane[y, xx] = plane[y, xx] + T.if_then_else(
                        y + pad - rh >= 0 and xx + pad - rw >= 0 and (y + pad - rh) % stride == 0 and (xx + pad - rw) % stride == 0
                        and (y + pad - rh) // stride < ho and (xx + pad - rw) // stride < wo,
                        g[0, c, (y + pad - rh) // stride, (xx + pad - rw) // stride] * (T.Cast("float32", w_dw[c, 0, rh, rw]) * s_dw[c]),
                        T.float32(0.0))
                plane[y, xx] = T.Select(
                    T.bitwise_and(T.shift_right(mask[((c * h + y) * w + xx) // 8], T.Cast("uint8", ((c * h + y) * w + xx) % 8)), T.uint8(1))
                    != T.uint8(0), plane[y, xx], T.float32(0.0))
            g_b[c] = T.float32(0.0)
            for y, xx in T.grid(h, w):
                g_b[c] = g_b[c] + plane[y, xx]
            g_b[c] = b_scale[c] * g_b[c]
            for ci, y, xx in T.grid(in_channels, h, w):
                g_x[0, ci, y, xx] = g_x[0, ci, y, xx] + plane[y, xx] * (T.Cast("float32", w_pw[c, ci, 0, 0]) * s_pw[c])
            if trained_x_zero is not None:  # the weight row c, after g_x has read its old value
                for j in range(in_channels):
                    wsum[0] = T.float32(0.0)
                    for y, xx in T.grid(h, w):
                        wsum[0] = wsum[0] + plane[y, xx] * T.Cast("float32", T.Cast("int32", x[0, j, y, xx]) - trained_x_zero)
                    w_new[c, j, 0, 0] = int8_step(w_pw[c, j, 0, 0], lr, w_scale[c] * wsum[0])

    if trained_x_zero is not None:
        @T.prim_func(private=True)
        def trained(w_pw: T.Buffer((channels, in_channels, 1, 1), "int8"), g: T.Buffer((1, channels, ho, wo), "float32"),
                    w_dw: T.Buffer((channels, 1, k, k), "int8"), s_dw: T.Buffer((channels,), "float32"), mask: T.Buffer((mask_bytes,), "uint8"),
                    b_scale: T.Buffer((channels,), "float32"), s_pw: T.Buffer((channels,), "float32"),
                    x: T.Buffer((1, in_channels, h, w), "int8"), w_scale: T.Buffer((channels,), "float32"), lr: T.Buffer((1,), "float32"),
                    g_x: T.Buffer((1, in_channels, h, w), "float32"), g_b: T.Buffer((channels,), "float32"),
                    w_new: T.Buffer((channels, in_channels, 1, 1), "int8")):
            block_backward(g, w_dw, s_dw, mask, b_scale, w_pw, s_pw, x, w_scale, lr, g_x, g_b, w_new)

        return trained

    @T.prim_func(private=True)
    def kernel(g: T.Buffer((1, channels, ho, wo), "float32"), w_dw: T.Buffer((channels, 1, k, k), "int8"),
               s_dw: T.Buffer((channels,), "float32"), mask: T.Buffer((mask_bytes,), "uint8"), b_scale: T.Buffer((channels,), "float32"),
               w_pw: T.Buffer((channels, in_channels, 1, 1), "int8"), s_pw: T.Buffer((channels,), "float32"),
               g_x: T.Buffer((1, in_channels, h, w), "float32"), g_b: T.Buffer((channels,), "float32")):
        block_backward(g, w_dw, s_dw, mask, b_scale, w_pw, s_pw, None, None, None, g_x, g_b, None)

    return kernel
