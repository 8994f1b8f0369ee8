"""StreamInputRows: the frozen layers from the image on run row by row, so neither the image nor their outputs sit whole in the arena.

Every model here is bound by its first layers (PAPER.md section 5): the 48 KB
int8 image, the first conv's 64 KB output, the 64x64 blocks after it.  In a
sparse scheme these layers are frozen, and their outputs have one reader each
(the next layer): output row ``y`` of a conv needs only the ``k`` input rows
``y*stride - pad ... + k - 1``, and a residual add's row ``y`` only row ``y``
of each operand.  So the chain of such layers can run like a line-buffered
image pipeline (MCUNetV2's patch-based inference, by rows and without
recomputation): this pass re-emits the first conv (the only reader of the
image) and each following frozen ``conv2d_requant`` / ``add_int8`` whose
output only the chain reads as ``conv2d_requant_rows`` / ``add_int8_rows``.
Each is the same PrimFunc, so the Relax VM computes the same bits, carrying in
``tinytrain.row_kernel`` its *band kernel*: the same layer on one window of
rows (``(1, C, k, W)``, the rows past the edges holding the input zero point)
giving one output row ``(1, Co, 1, Wo)``; a depthwise conv's band kernel takes
a group of its channels (``channel_group`` in the call's attributes, option
``row_window_bytes``), run once per group.  The chain stops before the first
layer that is not such a conv or add, and ends where only its last output is
read after it (a layer whose output the backward reads, for a mask or a saved
activation, ends it): at the shortest such cut with the least peak of the
chain's own buffers and of the layers after it, run whole, for the rings of
the wide expanded layers cost more than the later layers' small tensors.

The planner (``_buffers.py``, ``_row_pipeline.py``) then leaves the image and
the intermediate outputs out of the arena and gives each layer a ring of the
rows its readers still need (e.g. 3 rows for a 3x3 depthwise conv), a window
for a k-row input and the last layer a band buffer; the C step function
(``tvm_tinytrain/codegen/step.py``) runs the rows through the chain, the first
layer reading the image from a row reader: the image can come from a camera
line by line, from flash or from a file, and needs no RAM of its own.

A zero-point row contributes ``(x_zero - x_zero) * w = 0`` to each sum, which
is what the padding contributes; the sums are integer, so the band kernels give
the bits of the whole layers.  Where the image has another reader (the first
conv's weight gradient in a scheme that trains it), nothing changes.  Option
``stream_input`` turns the pass off, ``stream_layers=False`` streams the first
conv alone.  Run it after FuseConvRequant and before the other fusions, which
leave the streamed layers alone.

Before::

    def train_step(input: R.Tensor((1, 3, 128, 128), "int8"), ...):
        lv = R.call_tir(cls.conv2d_requant, (input, w0, b0, c0, c1), R.Tensor((1, 16, 64, 64), "int8"))
        lv1 = R.call_tir(cls.conv2d_requant1, (lv, w1, b1, c2, c3), R.Tensor((1, 16, 64, 64), "int8"))  # depthwise
        lv2 = R.call_tir(cls.conv2d_requant2, (lv1, w2, b2, c4, c5), R.Tensor((1, 8, 64, 64), "int8"))

After (band kernels ``(1, 3, 3, 128) -> (1, 16, 1, 64)``, ``(1, 16, 3, 64) -> (1, 16, 1, 64)``, ``(1, 16, 1, 64) -> (1, 8, 1, 64)``)::

        lv = R.call_tir(cls.conv2d_requant_rows, (input, w0, b0, c0, c1), R.Tensor((1, 16, 64, 64), "int8"))
        lv1 = R.call_tir(cls.conv2d_requant_rows1, (lv, w1, b1, c2, c3), R.Tensor((1, 16, 64, 64), "int8"))
        lv2 = R.call_tir(cls.conv2d_requant_rows2, (lv1, w2, b2, c4, c5), R.Tensor((1, 8, 64, 64), "int8"))
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from tvm_tinytrain.ops import te_kernels
from tvm_tinytrain.ops.schedule import compact_schedule
from tvm_tinytrain.relax_build import kernel_attrs

from ._fusion import reader_positions, reemit, relax_function_names
from ._ir import decode, shape_of
from ._row_pipeline import channel_group, pipeline
from .config import option
from .fuse_conv_requant import conv_requant_func

ROW_KERNEL = "tinytrain.row_kernel"
_ADD_ATTRS = ("a_zero", "b_zero", "a_mult", "b_mult", "shift", "y_zero", "qmin", "qmax")


def row_kernel(prim_func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """The band kernel a streamed layer's PrimFunc carries."""
    return prim_func.attrs[ROW_KERNEL]


def window_shape(call) -> tuple[int, int, int, int]:
    """A streamed conv's band kernel input: ``k`` rows of every channel of its input."""
    n, c, _, w = shape_of(call.args[0])
    return (n, c, shape_of(call.args[1])[2], w)


def _first_conv(mod, func: relax.Function) -> int | None:
    """The binding of the call that alone reads the image of ``func``, when it is a conv2d_requant on it; else None."""
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else 1
    if num_input < 1 or not func.params:
        return None
    image = func.params[0]
    if not isinstance(image.ty, relax.TensorType) or str(image.ty.dtype) != "int8" or len(image.ty.shape) != 4:
        return None
    readers = reader_positions(func).get(image, [])
    bindings = func.body.blocks[0].bindings
    if len(readers) != 1 or readers[0] >= len(bindings):
        return None
    call = decode(mod, bindings[readers[0]])
    if call is None or call.op != "conv2d_requant" or shape_of(image)[0] != 1 or any(a.same_as(image) for a in call.args[1:]):
        return None
    return readers[0]


def _follows(call, made: set) -> bool:
    """Whether ``call`` can run row by row on outputs of the chain so far: a frozen conv on one of them, or an add
    of two."""
    if call is None or shape_of(call.var)[0] != 1:
        return False
    if call.op == "conv2d_requant":
        return len(call.args) == 5 and call.args[0] in made and not any(a in made for a in call.args[1:])
    return call.op == "add_int8" and all(a in made for a in call.args)


def _chain(mod, func: relax.Function, layers: bool) -> list:
    """The calls to stream (see the module doc)."""
    start = _first_conv(mod, func)
    if start is None:
        return []
    bindings = func.body.blocks[0].bindings
    chain = [decode(mod, bindings[start])]
    made = {chain[0].var}
    for binding in bindings[start + 1:] if layers else ():
        call = decode(mod, binding)
        if not _follows(call, made):
            break
        chain.append(call)
        made.add(call.var)
    readers = reader_positions(func)
    cuts = [e for e in range(1, len(chain) + 1)
            if all(all(start <= r < start + e for r in readers.get(c.var, ())) for c in chain[:e - 1])]

    def peak(e: int) -> int:
        return max(pipeline(list(enumerate(chain[:e], start)), func.params[0]).bytes(), _layers_after(chain[e:], readers))

    return chain[:min(cuts, key=lambda e: (peak(e), e))]


def _layers_after(calls: list, readers) -> int:
    """Most bytes the layers ``calls`` need at once when not streamed, as the later passes will run them (PAPER.md
    section 5): a conv's input and output, a depthwise conv's larger one (it runs in place), with a 1x1 expansion
    fused into the depthwise conv that alone reads it, and an add's operands (it runs in place)."""
    def size(v) -> int:
        return int(np.prod(shape_of(v)))

    most, fused = 0, set()
    for k, call in enumerate(calls):
        after = calls[k + 1] if k + 1 < len(calls) else None
        if call.var in fused:
            continue
        if call.op == "add_int8":
            most = max(most, size(call.args[0]) + size(call.args[1]))
        elif call.attrs["groups"] > 1:
            most = max(most, size(call.args[0]), size(call.var))
        elif (after is not None and after.op == "conv2d_requant" and after.attrs["groups"] > 1
              and after.args[0].same_as(call.var) and len(readers.get(call.var, ())) == 1):
            most = max(most, size(call.args[0]) + size(after.var))
            fused.add(after.var)
        else:
            most = max(most, size(call.args[0]) + size(call.var))
    return most


def band_kernel(call, group: int) -> tvm.tirx.PrimFunc:
    """``call`` on one window of rows, giving one output row; on ``group`` of its output channels when fewer than all
    (a depthwise conv's group reads its own input channels; the C step calls it once per group, with the group's
    weights and output)."""
    if call.op.startswith("conv2d_requant"):
        n, c, k, w = window_shape(call)
        attrs, params = call.attrs, [(shape_of(a), str(a.ty.dtype)) for a in call.args[1:]]
        if group < shape_of(call.var)[1]:  # weights, bias, multiplier and shift of one group of output channels
            params = [((group, *shape_of(a)[1:]), str(a.ty.dtype)) for a in call.args[1:]]
            if call.attrs["groups"] > 1:  # a depthwise conv's group reads its own input channels only
                attrs, c = {**call.attrs, "groups": group}, group
        return conv_requant_func(attrs, [((n, c, k, w), "int8"), *params], call.args[-1], pad_h=0)
    n, c, _, w = shape_of(call.var)
    a, b = (te.placeholder((n, c, 1, w), "int8", f"arg{i}") for i in range(2))
    y = te_kernels.add(a, b, *(call.attrs[k] for k in _ADD_ATTRS))
    return compact_schedule(te.create_prim_func([a, b, y])).without_attr("global_symbol")


def rows_kernel(mod: tvm.IRModule, call) -> tuple[tvm.tirx.PrimFunc, str]:
    """``call``'s PrimFunc as its streamed op, carrying its band kernel."""
    op = f"{call.op}_rows"
    group = channel_group(call, int(option("row_window_bytes")))
    attrs = {**{k: v for k, v in call.attrs.items() if k != "node"}, "channel_group": group}
    return mod[call.gvar].with_attrs(kernel_attrs(op, call.node, **attrs)).with_attr(ROW_KERNEL, band_kernel(call, group)), op


@tvm.transform.module_pass(opt_level=0, name="StreamInputRows")
class StreamInputRows:
    """Re-emit the first conv of each Relax function, and the frozen layers after it, as streamed layers (options
    ``stream_input``, ``stream_layers``; run after FuseConvRequant, before the other fusions)."""

    def __init__(self, enabled: bool | None = None, layers: bool | None = None):
        self.enabled, self.layers = enabled, layers

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not option("stream_input", self.enabled):
            return mod
        layers = option("stream_layers", self.layers)
        for name in relax_function_names(mod, "StreamInputRows"):
            streamed = {c.var: rows_kernel(mod, c) for c in _chain(mod, mod[name], layers)}
            if not streamed:
                continue

            def emit(bb, binding, streamed=streamed) -> bool:
                if binding.var not in streamed:
                    return False
                prim, op = streamed[binding.var]
                gv = bb.add_func(prim, op)
                args = relax.Tuple(list(binding.value.args[1].fields))
                bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(relax.call_tir(gv, args, binding.var.ty))))
                return True

            mod = reemit(mod, name, emit)
        return mod
