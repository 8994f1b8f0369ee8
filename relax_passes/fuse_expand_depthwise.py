"""FuseExpandDepthwise: an inverted block's 1x1 expansion and depthwise conv as one kernel, one channel at a time.

A depthwise conv reads each input channel alone, so the expanded tensor of a
MobileNetV2 block (up to 192 KB in the paper's models) never has to exist
whole: this pass fuses ``conv2d_requant`` (1x1, groups 1) with the depthwise
``conv2d_requant`` that is its only reader into one PrimFunc whose schedule
computes one expanded channel plane inside the depthwise conv's channel loop
(PAPER.md section 5).  The plane (H*W bytes) is the kernel's only workspace.
A block the gradient crosses is left alone when its expanded tensor has other
readers (masks, saved activations); run after FuseDepthwiseBackward, whose
kernel may recompute a block's masks, and so leave the depthwise conv the
only reader.  Planes of fewer pixels than the option ``min_fused_plane``
(65: 8x8 and smaller) stay two kernels: there the fused kernel's cost per
channel (its bordered plane, a pass over the whole input for each channel)
outweighs the blocked GEMM's, and the expanded tensor is small (MCUNet's
``paper-99kb``: 2.3 M fewer instructions per step on the Cortex-M7, 64 bytes
more arena, ``scripts/device_table.py``).

Before::

    lv3 = R.call_tir(cls.conv2d_requant, (lv2, w_pw1, b1, c1, c2), R.Tensor((1, 32, 64, 64), "int8"))
    lv4 = R.call_tir(cls.conv2d_requant1, (lv3, w_dw, b2, c3, c4), R.Tensor((1, 32, 32, 32), "int8"))

After::

    lv4 = R.call_tir(cls.expand_depthwise, (lv2, w_pw1, b1, c1, c2, w_dw, b2, c3, c4), R.Tensor((1, 32, 32, 32), "int8"))
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te

from tvm_tinytrain.ops import te_kernels, tir_expand_depthwise
from tvm_tinytrain.ops.schedule import current_variant, finish_tile, tile_reduction
from tvm_tinytrain.relax_build import kernel_attrs

from ._fusion import conv_quant, fuse_pairs, placeholders, relax_function_names, wide_shift
from ._ir import shape_of
from .config import option


def _conv_requant(x, w, b, m, s, a: dict, wide: bool, pad: int | None = None):
    acc = te_kernels.conv2d_acc(x, w, a["x_zero"], a["stride"], a["groups"], pad)
    return te_kernels.requantize(acc, b, m, s, a["y_zero"], a["qmin"], a["qmax"], wide)


def fused_expand_depthwise(expand, depthwise) -> tvm.tirx.PrimFunc:
    """The two convs in one PrimFunc: each expanded channel plane is computed where the depthwise conv needs it.

    The optimized variant writes the plane with a border of the depthwise conv's zero point (so its taps need
    no bounds checks) and computes the depthwise outputs a tile at a time; when the expansion's shape allows,
    it is the DSP kernel of :mod:`tvm_tinytrain.ops.tir_expand_depthwise`.
    """
    (n, ic, h, w), k = shape_of(expand.args[0]), shape_of(depthwise.args[1])[2]
    if current_variant() == "optimized" and tir_expand_depthwise.fits(ic, n, w):
        return tir_expand_depthwise.expand_depthwise(ic, shape_of(expand.var)[1], h, w, k, depthwise.attrs["stride"],
                                                     conv_quant(expand), conv_quant(depthwise),
                                                     (wide_shift(expand.args[4]), wide_shift(depthwise.args[4])))
    args = placeholders(expand.args + depthwise.args[1:])
    expanded = _conv_requant(*args[:5], expand.attrs, wide_shift(expand.args[4]))
    optimized = current_variant() == "optimized"
    pad = (shape_of(depthwise.args[1])[2] - 1) // 2 if optimized else 0
    if pad:
        expanded = te_kernels.pad_plane(expanded, pad, depthwise.attrs["x_zero"])
    y = _conv_requant(expanded, *args[5:], depthwise.attrs, wide_shift(depthwise.args[4]), 0 if pad else None)
    sch = s_tir.Schedule(te.create_prim_func([*args, y]))
    blocks = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if pad:  # acc1, rq1, plane, acc2, rq2: the expansion's requantization is computed as the plane is written
        sch.compute_inline(sch.get_sblock(blocks[1]))
        blocks = [blocks[0], blocks[2], blocks[3], blocks[4]]
    acc1, rq1, acc2, rq2 = (sch.get_sblock(b) for b in blocks)
    tiled = optimized and tile_reduction(sch, acc2)
    sch.reverse_compute_at(rq2, sch.get_loops(acc2)[3])  # depthwise accumulator: a scalar (or a tile) per output pixel
    sch.compute_at(rq1, sch.get_loops(acc2)[1])  # one expanded channel plane per depthwise channel
    if tiled:
        finish_tile(sch, blocks[2])
        sch.compute_at(acc1, sch.get_loops(rq1)[-2])  # expansion accumulators: one plane row
        # Tiled along that row only: a row width no tile divides would make tile_reduction pick an axis outside it.
        if w % 2 == 0 and tile_reduction(sch, acc1):
            finish_tile(sch, blocks[0])
    else:
        sch.compute_at(acc1, sch.get_loops(rq1)[-1])  # expansion accumulator: a scalar per plane pixel
    return sch.mod["main"].without_attr("global_symbol")


def _fusable(expand, depthwise, readers, min_plane: int) -> bool:
    return (expand.op == depthwise.op == "conv2d_requant" and len(expand.args) == 5 and len(depthwise.args) == 5
            and expand.attrs["groups"] == 1 and shape_of(expand.args[1])[2:] == (1, 1) and depthwise.attrs["groups"] > 1
            and depthwise.args[0].same_as(expand.var) and readers.get(expand.var) == 1
            and shape_of(expand.var)[2] * shape_of(expand.var)[3] >= min_plane)


def _pairs(calls, readers, min_plane: int) -> dict:
    """depthwise var -> the 1x1 expansion it alone reads, on planes of at least ``min_plane`` pixels."""
    producer = {c.var: c for c in calls if c is not None}
    return {c.var: producer[c.args[0]] for c in calls
            if c is not None and c.args and c.args[0] in producer and _fusable(producer[c.args[0]], c, readers, min_plane)}


def _fused_kernel(expand, depthwise) -> tuple[tvm.tirx.PrimFunc, str]:
    attrs = kernel_attrs("expand_depthwise", f"{expand.node}+{depthwise.node}", stride=depthwise.attrs["stride"])
    return fused_expand_depthwise(expand, depthwise).with_attrs(attrs), "expand_depthwise"


@tvm.transform.module_pass(opt_level=0, name="FuseExpandDepthwise")
class FuseExpandDepthwise:
    """Fuse each 1x1 expansion whose only reader is a depthwise conv into it, on planes of at least ``min_plane``
    pixels (option ``min_fused_plane``; run after FuseConvRequant)."""

    def __init__(self, min_plane: int | None = None):
        self.min_plane = min_plane

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        names = relax_function_names(mod, "FuseExpandDepthwise")
        min_plane = int(option("min_fused_plane", self.min_plane))
        for name in names:
            mod = fuse_pairs(mod, name, lambda calls, readers: _pairs(calls, readers, min_plane), _fused_kernel)
        return relax.transform.DeadCodeElimination(names)(mod)
