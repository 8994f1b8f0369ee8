"""FuseDepthwiseBackward: an inverted block's depthwise input gradient consumed a few channel planes at a time.

Going backwards through ``expand (1x1) -> depthwise``, the depthwise conv's
input gradient is a whole float32 tensor of the expanded width (e.g. 96 KB
for 96 channels of 16x16, the peak of several sparse steps), read only by
the expansion's clamp mask, whose result only the expansion's bias gradient
and input gradient read.  All of these work channel by channel on the
expanded side, so this pass replaces the four kernels with one
``depthwise_block_backward`` kernel (``tvm_tinytrain/ops/tir_backward.py``)
that builds a tile of masked planes at a time (one in the reference variant;
in the optimized one up to :data:`MAX_TILE` that fit ``max_plane_bytes``) and
adds them into the bias gradient and the expansion's input gradient at once:
same bits, and only a tile of the big tensor ever exists.  Where the
expansion's whole weight is trained too (its gradient and SGD step fused by
FuseWeightUpdate), row ``c`` of that gradient needs masked plane ``c`` only:
with the option ``fuse_trained_expansion`` (on by default),
``depthwise_block_backward_sgd`` also updates the weight, the tile's rows in
place right after its planes have used their old values for the input
gradient (e.g. MCUNet's blocks[10], a 60 KB float32 tensor at the peak of
``paper-99kb``: 9 KB less arena for about 1 M more instructions on the M7,
``scripts/device_table.py``).

The depthwise conv's output gradient is a tensor of the expanded width too,
the block's 1x1 projection's input gradient, masked by the depthwise clamp
(e.g. 48 KB for 192 channels of 8x8 at the peak of MCUNet's ``paper-99kb``).
Where the depthwise weight is frozen, only the depthwise input gradient and
bias gradient read it, so the kernel starts from the projection's output
gradient instead (``projection``): plane ``c`` is the projection's input
gradient for channel ``c``, masked, and the depthwise bias gradient becomes
one more output.  A stride-1 depthwise conv is fused only with this front:
without it, its input gradient is no larger than its operand and
DepthwiseInPlace already writes it over that operand, with faster (tiled)
kernels.  An expansion trained on some input channels only (SparseUpdate's
merge of its flash weight and a RAM slice) is fused too: the kernel reads
the merge and updates the slice.  It applies when the projection's weight is
whole and a plane fits ``max_plane_bytes``.  In the block where the backward
stops, nothing reads the expansion's input gradient, and the kernel is the same
without it (no ``g_x``; ``w_pw`` and ``s_pw`` only where the weight is trained,
``w_pw`` then; e.g. Proxyless ``paper-148kb``'s blocks[5], whose 64 KB
float32 tensors of the expanded width were that step's peak).  Where the backward stops even earlier,
at the bias of the depthwise conv, the projection's front alone becomes a
``projection_bias_grad`` kernel, one plane at a time (MCUNet ``paper-148kb``'s
blocks[6], whose 48 KB projection input gradient was that step's peak).  Run it
after ReorderUpdates and before DepthwiseInPlace.

A block whose whole expansion is trained keeps its input ``x`` for the weight
gradient anyway, and the two clamp masks are functions of ``x`` and of weights
and biases that the step updates only after this kernel.  With the option
``recompute_masks`` (on by default) the kernel takes the two convs' biases and
requantization instead of the masks and recomputes each channel's masks from
``x`` (the forward's integer sums, so the same bits): the masks, one bit per
expanded element kept from the forward to the backward (e.g. 20 KB at the
peak of MCUNet's ``paper-148kb``), are no longer stored, for one more
expansion and depthwise conv of the block in the backward.  Their
``clamp_mask`` kernels go, and the forward's expansion is then read by its
depthwise conv alone, which FuseExpandDepthwise (run after this pass) fuses.

In a residual block the projection's output gradient is the block's output gradient masked by the projection's
clamp, and the skip path reads that output gradient unmasked, so the masked copy cannot overwrite it: at the
block's backward three float32 tensors of the block's width are alive (the unmasked one, the copy, the expansion's
input gradient; e.g. MbV2 ``paper-138kb``'s blocks[12]).  With the option ``masked_reads`` (on by default) the
fused kernel reads the unmasked gradient through the mask (``g_out, g_mask`` in place of ``g_out``, the same
select per element) and the projection's bias gradient becomes ``masked_bias_grad`` over it: the copy is never
stored, for a mask test per multiply-add of the projection's input gradient.

The SGD steps of the biases whose gradients the kernel sums (the expansion's, and the depthwise conv's behind the
front) are applied inside it with the option ``fuse_bias_updates`` (on by default), in place, each channel's as
soon as its gradient is summed: no float32 bias gradient of the expanded width is left alive beside the kernel's
other tensors, and the ``sgd_update_int32`` kernels go (the kernel's ``tinytrain.in_place`` attribute names the
outputs written over their inputs).

Before::

    g_dw = R.call_tir(cls.conv2d_input_grad, (g_acc, w_dw, s_dw), R.Tensor((1, 96, 16, 16), "float32"))
    g_m = R.call_tir(cls.apply_mask, (g_dw, mask), R.Tensor((1, 96, 16, 16), "float32"))
    g_b = R.call_tir(cls.bias_grad, (g_m, b_scale), R.Tensor((96,), "float32"))
    b_new = R.call_tir(cls.sgd_update_int32, (b, g_b, lr), R.Tensor((96,), "int32"))
    g_x = R.call_tir(cls.conv2d_input_grad, (g_m, w_pw, s_pw), R.Tensor((1, 16, 16, 16), "float32"))

After::

    fused = R.call_tir(cls.depthwise_block_backward, (g_acc, w_dw, s_dw, mask, b_scale, w_pw, s_pw),
                       [R.Tensor((1, 16, 16, 16), "float32"), R.Tensor((96,), "float32")])
    g_x = fused[0]
    g_b = fused[1]
    b_new = R.call_tir(cls.sgd_update_int32, (b, g_b, lr), R.Tensor((96,), "int32"))

With the expansion's weight update ``w_new = R.call_tir(cls.conv2d_weight_grad_sgd, (w_pw, x, g_m, w_scale, lr), ...)``::

    fused = R.call_tir(cls.depthwise_block_backward_sgd, (w_pw, g_acc, w_dw, s_dw, mask, b_scale, s_pw, x, w_scale, lr),
                       [R.Tensor((96, 16, 1, 1), "int8"), R.Tensor((1, 16, 16, 16), "float32"), R.Tensor((96,), "float32")])
    w_new = fused[0]
    g_x = fused[1]
    g_b = fused[2]

With the projection's front (below) and ``recompute_masks``, ``mask`` and ``mask_dw`` give way to the forward's
``(b1, m1, s1, b2, m2, s2)``, the bias, multiplier and shift of ``y1 = conv2d_requant(x, w_pw, b1, m1, s1)`` and of the
depthwise conv ``conv2d_requant(y1, w_dw, b2, m2, s2)``, after ``lr``.

With the projection's front, ``g_acc`` above being
``R.call_tir(cls.apply_mask, (R.call_tir(cls.conv2d_input_grad, (g_out, w_proj, s_proj), ...), mask_dw), ...)``
with ``g_b_dw = R.call_tir(cls.bias_grad, (g_acc, b_scale_dw), ...)``::

    fused = R.call_tir(cls.depthwise_block_backward, (g_out, w_proj, s_proj, mask_dw, b_scale_dw, w_dw, s_dw, mask, b_scale,
                                                      w_pw, s_pw),
                       [R.Tensor((1, 16, 16, 16), "float32"), R.Tensor((96,), "float32"), R.Tensor((96,), "float32")])
    g_x = fused[0]
    g_b = fused[1]
    g_b_dw = fused[2]
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from tvm_tinytrain.ops import te_backward
from tvm_tinytrain.ops.schedule import current_variant, kernel_variant
from tvm_tinytrain.ops.tir_backward import depthwise_block_backward, projection_bias_grad
from tvm_tinytrain.relax_build import emit_kernel, kernel_attrs

from ._fusion import PlanePass, conv_quant, reader_counts, reemit, wide_shift
from ._ir import decode, shape_of
from .config import option

OP = "depthwise_block_backward"
TRAINED_OP = "depthwise_block_backward_sgd"  # with the expansion's weight update, in place (_buffers.in_place_fields)
FRONT_OP = "projection_bias_grad"  # the projection's front alone, where the backward stops at the bias behind it
MASKED_BIAS_OP = "masked_bias_grad"  # a bias gradient reading a residual's gradient through its clamp mask
MAX_TILE = 8  # planes at a time: their 8 weight-gradient accumulators and 8 real weights fit the FPU's 32 registers


def _groups(calls, readers, max_plane: int, trained_expansion: bool, recompute_masks: bool, masked_reads: bool,
            bias_updates: bool) -> dict:
    """var of the first replaced binding -> (the projection's front (its input gradient, the depthwise clamp's mask,
    the depthwise bias gradient) or None, depthwise call, mask call, bias-gradient call, expansion input-gradient
    call or None where the backward stops, the expansion's fused weight update or None, the forward's (expansion,
    depthwise conv) whose masks the kernel recomputes or None, the front's masked source (:func:`_masked_source`)
    or None, the SGD steps of the expansion's and the depthwise conv's biases that the kernel applies
    (:func:`_bias_updates`) or None)."""
    by_input = _readers_by_input(calls)
    producer = {c.var: c for c in calls if c is not None}
    sgd_of = {c.args[1]: c for c in calls if c is not None and c.op == "sgd_update_int32"}
    groups = {}
    for d in calls:
        if d is None or d.op != "conv2d_input_grad" or d.attrs["groups"] <= 1 or len(d.args) != 3 or readers.get(d.var) != 1:
            continue
        masks = [m for m in by_input.get(d.var, []) if m.op == "apply_mask"]
        if len(masks) != 1:
            continue
        m = masks[0]
        readers_of_m = {c.op: c for c in by_input.get(m.var, [])}
        b, p, u = (readers_of_m.get(op) for op in ("bias_grad", "conv2d_input_grad", "conv2d_weight_grad_sgd"))
        _, _, h, w = shape_of(d.var)
        if (b is None or (p is not None and not _is_1x1_input_grad(p, merged_ok=True)) or h * w * 4 > max_plane
                or readers.get(m.var) != 1 + (p is not None) + (u is not None)):
            continue
        if u is None and p is not None and len(p.args) == 4:
            continue  # a merged expansion whose slice update is not next to it
        if u is not None and not (trained_expansion and _trained_expansion(u, p, readers)):
            continue
        front = _projection_front(d, producer, by_input, readers)
        if d.attrs["stride"] == 1 and front is None:
            continue  # DepthwiseInPlace writes a stride-1 input gradient over its operand, with faster kernels
        forward = _forward_convs(front, d, m, u, producer, readers) if recompute_masks else None
        source = _masked_source(front[0], producer, by_input, readers) if front and masked_reads else None
        updates = _bias_updates([b, *(front[2:] if front else [])], forward, sgd_of, readers) if bias_updates else None
        groups[(front[0] if front else d).var] = (front, d, m, b, p, u, forward, source, updates)
    return groups


def _readers_by_input(calls) -> dict:
    """var -> the calls that read it as their gradient operand: argument 0, or argument 2 of a fused weight update."""
    by_input: dict = {}
    for c in calls:
        if c is not None and c.args:
            by_input.setdefault(c.args[0], []).append(c)
            if c.op == "conv2d_weight_grad_sgd":
                by_input.setdefault(c.args[2], []).append(c)  # it reads the masked gradient as its argument 2
    return by_input


def _bias_updates(grads, forward, sgd_of, readers):
    """The SGD steps of the bias gradients ``grads`` (the expansion's, then the depthwise conv's where the front is
    fused) when each is the gradient's only reader, on the bias that a recomputing kernel reads too; else None."""
    updates = [sgd_of.get(g.var) for g in grads]
    if any(s is None or readers.get(g.var) != 1 for g, s in zip(grads, updates)):
        return None
    if forward is not None and not all(c.args[2].same_as(s.args[0]) for c, s in zip(forward, updates)):
        return None
    return updates


def _forward_convs(front, d, m, u, producer, readers):
    """(expansion, depthwise conv) of the forward whose clamp masks only this group reads, when the kernel can
    recompute them: the projection's front is fused and the expansion is trained whole (the forward reads the weight
    ``u`` updates, not a merge), on the input ``x`` it reads (``u.args[1]``).  Else None."""
    if front is None or u is None:
        return None
    convs = []
    for mask, reads, weight in ((m.args[1], u.args[1], u.args[0]), (front[1].args[1], None, d.args[1])):
        clamp = producer.get(mask)
        conv = producer.get(clamp.args[0]) if clamp is not None and clamp.op == "clamp_mask" else None
        if (conv is None or conv.op != "conv2d_requant" or len(conv.args) != 5 or readers.get(mask) != 1
                or (clamp.attrs["qmin"], clamp.attrs["qmax"]) != (conv.attrs["qmin"], conv.attrs["qmax"])
                or not conv.args[1].same_as(weight) or not conv.args[0].same_as(reads if reads is not None else convs[0].var)):
            return None
        convs.append(conv)
    expand, depthwise = convs
    return (expand, depthwise) if depthwise.attrs["stride"] == d.attrs["stride"] else None


def _fronts_alone(calls, readers, max_plane: int, masked_reads: bool) -> dict:
    """bias-gradient var -> (projection input gradient, clamp mask, bias gradient, its masked source or None) where the
    backward stops at the bias of the conv the projection reads: only the mask reads the input gradient, only the bias
    gradient the mask."""
    producer, by_input = {c.var: c for c in calls if c is not None}, _readers_by_input(calls)
    fronts = {}
    for bds in calls:
        md = producer.get(bds.args[0]) if bds is not None and bds.op == "bias_grad" else None
        p2 = producer.get(md.args[0]) if md is not None and md.op == "apply_mask" else None
        if (p2 is not None and _is_1x1_input_grad(p2) and readers.get(p2.var) == 1 and readers.get(md.var) == 1
                and shape_of(p2.var)[2] * shape_of(p2.var)[3] * 4 <= max_plane):
            fronts[bds.var] = (p2, md, bds, _masked_source(p2, producer, by_input, readers) if masked_reads else None)
    return fronts


def _masked_source(p2, producer, by_input, readers):
    """(apply_mask, the projection's bias gradient or None) when the projection's output gradient ``p2.args[0]`` is a
    masked copy whose operand other kernels read too (a residual block's output gradient, which the skip path reads,
    so the copy cannot overwrite it), and only ``p2`` and that bias gradient read the copy: they can read the operand
    through the mask instead, and the copy is never stored.  Else None."""
    ma = producer.get(p2.args[0])
    if ma is None or ma.op != "apply_mask" or readers.get(ma.args[0], 0) < 2:
        return None
    others = [c for c in by_input.get(ma.var, []) if c is not p2]
    if len(others) > 1 or any(c.op != "bias_grad" for c in others) or readers.get(ma.var) != 1 + len(others):
        return None
    return ma, (others[0] if others else None)


def _is_1x1_input_grad(call, merged_ok: bool = False) -> bool:
    """A groups-1 1x1 stride-1 conv's input gradient on a whole weight or, with ``merged_ok``, on SparseUpdate's
    merge of a frozen weight and a trained slice of its input channels (arguments ``g, frozen, trained, scale``)."""
    return (call is not None and call.op == "conv2d_input_grad" and call.attrs["groups"] == 1
            and (len(call.args) == 3 or (merged_ok and len(call.args) == 4))
            and shape_of(call.args[1])[2:] == (1, 1) and call.attrs["stride"] == 1)


def _projection_front(d, producer, by_input, readers):
    """(projection input gradient, depthwise clamp mask, depthwise bias gradient) when the depthwise conv's masked
    output gradient ``d.args[0]`` comes from the block's 1x1 projection and only ``d`` and that bias gradient read it
    (a trained depthwise weight would read it too: no front then), else None."""
    md = producer.get(d.args[0])
    if md is None or md.op != "apply_mask" or readers.get(md.var) != 2:
        return None
    p2 = producer.get(md.args[0])
    bds = [c for c in by_input.get(md.var, []) if c.op == "bias_grad"]
    if not _is_1x1_input_grad(p2) or readers.get(p2.var) != 1 or len(bds) != 1:
        return None
    return p2, md, bds[0]


def _trained_expansion(u, p, readers) -> bool:
    """Whether ``u`` updates the expansion weight that ``p`` reads (the whole weight, or the trained slice of a merged
    one; where the backward stops, no ``p``), from the input channels it trains, and nothing else reads that weight
    in the step (its readers are then the forward conv, ``p`` and ``u``)."""
    weight, x = u.args[0], u.args[1]
    read_by_p = p is None or weight.same_as(p.args[2] if len(p.args) == 4 else p.args[1])
    return (read_by_p and not u.attrs["depthwise"] and u.attrs["kernel"] == 1 and u.attrs["stride"] == 1
            and shape_of(x)[1] == shape_of(weight)[1] and readers.get(weight) == 2 + (p is not None))


def planes_per_tile(channels: int, plane_bytes: int, max_plane: int) -> int:
    """Planes the kernel builds at a time: one in the reference variant; in the optimized one the most, up to
    :data:`MAX_TILE`, that divide ``channels`` and fit ``max_plane_bytes`` together."""
    if current_variant() != "optimized":
        return 1
    return max(t for t in range(1, MAX_TILE + 1) if channels % t == 0 and t * plane_bytes <= max(max_plane, plane_bytes))


def _front_input(p2, source) -> list:
    """The projection's output gradient as the fused kernel reads it: ``[g_out]``, or from a masked source
    ``[g, g_mask]``."""
    return [p2.args[0]] if source is None else list(source[0].args)


def _kernel(front, d, b, p, u, forward, source, updates, max_plane: int) -> tvm.tirx.PrimFunc:
    _, channels, h, w = shape_of(d.var)
    _, _, ho, wo = shape_of(d.args[0])
    # Where the backward stops there is no input gradient: the kernel sees a trained slice as the whole weight.
    in_channels = shape_of(p.var)[1] if p is not None else shape_of(u.args[0])[1] if u is not None else 1
    merged = [int(c) for c in p.attrs["merged_channels"]] if p is not None and len(p.args) == 4 else None
    recompute = None if forward is None else [*(conv_quant(c) for c in forward), *(wide_shift(c.args[4]) for c in forward)]
    form = {"channels": channels, "in_channels": in_channels, "h": h, "w": w, "ho": ho, "wo": wo, "k": shape_of(d.args[1])[2],
            "stride": d.attrs["stride"], "trained_x_zero": None if u is None else u.attrs["x_zero"],
            "projection": None if front is None else shape_of(front[0].args[0])[1], "merged": merged, "recompute": recompute,
            "input_grad": p is not None, "masked_front": source is not None, "update_biases": updates is not None}
    node = "+".join(c.node for c in (*(front[:1] if front else ()), d, p if p is not None else b))
    static = {"stride": d.attrs["stride"], **({} if u is None else {"param": u.attrs["param"]}), "form": json.dumps(form)}
    return _build(form, planes_per_tile(channels, h * w * 4, max_plane), kernel_attrs(OP if u is None else TRAINED_OP, node, **static))


def _build(form: dict, tile: int, attrs: dict) -> tvm.tirx.PrimFunc:
    args = {**form, "merged": None if form["merged"] is None else tuple(form["merged"]),
            "recompute": None if form["recompute"] is None else tuple(form["recompute"])}
    return depthwise_block_backward(**args, tile=tile).with_attrs({**attrs, "tinytrain.tile": tile})


def retiled(prim: tvm.tirx.PrimFunc, tile: int) -> tvm.tirx.PrimFunc:
    """An optimized fused block backward kernel of this pass (only that variant builds more than one plane at a time)
    built again with ``tile`` planes at a time (same bits: the tile only orders the planes' work)."""
    attrs = {k: v for k, v in prim.attrs.items() if k.startswith("tinytrain.") and k not in ("tinytrain.tile", "tinytrain.in_place")}
    with kernel_variant("optimized"):
        return _build(json.loads(str(prim.attrs["tinytrain.form"])), tile, attrs)


@tvm.transform.module_pass(opt_level=0, name="FuseDepthwiseBackward")
class FuseDepthwiseBackward(PlanePass):
    """Fuse each depthwise input gradient with the expansion's mask, bias gradient, input gradient, with
    ``trained_expansion`` (option ``fuse_trained_expansion``) a trained expansion's weight update, and, where the
    depthwise weight is frozen, the projection's input gradient in front, reading a residual's gradient through its
    mask with ``masked_reads``, and the biases' SGD steps with ``fuse_bias_updates`` (see the module doc)."""

    def __init__(self, max_plane_bytes: int | None = None, trained_expansion: bool | None = None,
                 recompute_masks: bool | None = None, masked_reads: bool | None = None, bias_updates: bool | None = None):
        super().__init__(max_plane_bytes)
        self.bias_updates = bias_updates
        self.trained_expansion = trained_expansion
        self.recompute_masks = recompute_masks
        self.masked_reads = masked_reads

    def _rewrite(self, mod, name: str, max_plane: int) -> tvm.IRModule:
        func = mod[name]
        bindings = list(func.body.blocks[0].bindings)
        calls = [decode(mod, b) for b in bindings]
        readers = reader_counts(func)
        masked_reads = bool(option("masked_reads", self.masked_reads))
        groups = _groups(calls, readers, max_plane, bool(option("fuse_trained_expansion", self.trained_expansion)),
                         bool(option("recompute_masks", self.recompute_masks)), masked_reads,
                         bool(option("fuse_bias_updates", self.bias_updates)))
        fronts = _fronts_alone(calls, readers, max_plane, masked_reads)
        if not groups and not fronts:
            return mod
        replaced = {c.var for front, d, m, b, p, u, _, _, updates in groups.values()
                    for c in (*(front or ()), d, m, b, p, u, *(updates or ())) if c is not None} - set(groups)
        replaced |= {c.var for front in fronts.values() for c in front[:2]}
        # A masked source's copy goes; its bias gradient reads the source through the mask (masked_bias_grad).
        sources = [s for s in (*(g[7] for g in groups.values()), *(f[3] for f in fronts.values())) if s is not None]
        replaced |= {ma.var for ma, _ in sources}
        masked_bias = {pb.var: (ma, pb) for ma, pb in sources if pb is not None}

        def emit(bb, binding) -> bool:
            if binding.var in masked_bias:
                ma, pb = masked_bias[binding.var]
                masked = emit_kernel(bb, te_backward.masked_bias_grad, (*ma.args, pb.args[1]), MASKED_BIAS_OP, pb.node, pb.attrs)
                bb.emit_normalized(relax.VarBinding(pb.var, masked))
                return True
            if binding.var in fronts:
                p2, md, bds, source = fronts[binding.var]
                _, channels, h, w = shape_of(p2.var)
                prim = projection_bias_grad(channels, shape_of(p2.args[0])[1], h, w, source is not None)
                gv = bb.add_func(prim.with_attrs(kernel_attrs(FRONT_OP, p2.node)), FRONT_OP)
                call = relax.call_tir(gv, relax.Tuple([*_front_input(p2, source), *p2.args[1:], md.args[1], bds.args[1]]), bds.var.ty)
                bb.emit_normalized(relax.VarBinding(bds.var, bb.normalize(call)))
                return True
            if binding.var in replaced:
                return True  # now bound by the fused kernel
            if binding.var not in groups:
                return False
            front, d, m, b, p, u, forward, source, updates = groups[binding.var]
            gv = bb.add_func(_kernel(front, d, b, p, u, forward, source, updates, max_plane), OP if u is None else TRAINED_OP)
            # The projection's front replaces the depthwise output gradient by (g_out[, g_mask], w_proj, s_proj,
            # mask_dw, b_scale_dw) and adds the depthwise bias gradient as the last output.
            g = ([d.args[0]] if front is None
                 else [*_front_input(front[0], source), *front[0].args[1:], front[1].args[1], front[2].args[1]])
            # Where the backward stops (no p) the expansion's weight and scale serve no input gradient.
            if u is None:
                args = [*g, d.args[1], d.args[2], m.args[1], b.args[1], *(p.args[1:3] if p is not None else [])]
            else:  # (w_pw, g, w_dw, s_dw, mask, b_scale, s_pw, x, w_scale, lr[, frozen]): the weight (or trained slice) first,
                # updated in place; a merged expansion's frozen weight last
                args = [u.args[0], *g, d.args[1], d.args[2], m.args[1], b.args[1], *([p.args[-1]] if p is not None else []), u.args[1],
                        u.args[3], u.args[4], *([p.args[1]] if p is not None and len(p.args) == 4 else [])]
                if forward is not None:  # the masks give way to the forward convs' bias, multiplier and shift
                    masks = (m.args[1], front[1].args[1])
                    args = [a for a in args if not any(a.same_as(k) for k in masks)] + [a for c in forward for a in c.args[2:]]
            if updates is not None:  # lr where the form has none, the biases where no recomputation reads them
                args += [*([updates[0].args[2]] if u is None else []), *([s.args[0] for s in updates] if forward is None else [])]
            grads = updates or [b, *(front[2:] if front else [])]
            outs = [c for c in (u, p, *grads) if c is not None]  # the updated weight first
            fused = bb.emit(relax.call_tir(gv, relax.Tuple(args), [c.var.ty for c in outs]))
            for k, c in enumerate(outs):
                bb.emit_normalized(relax.VarBinding(c.var, relax.TupleGetItem(fused, k)))
            return True

        return reemit(mod, name, emit)
