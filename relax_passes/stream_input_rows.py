"""StreamInputRows: the first conv reads the image a band of rows at a time, so the image never sits in the arena.

Every model here is bound by its first conv (PAPER.md section 5): the 48 KB
int8 image and the conv's 64 KB output are alive together.  The first conv
is frozen in a sparse scheme, so nothing else reads the image: its output row
``y`` needs only the ``k`` input rows ``y*stride - pad ... + k - 1``.  This
pass re-emits that conv (the only reader of the function's image) as
``conv2d_requant_rows``: the same PrimFunc, so the Relax VM computes the same
bits, carrying in ``tinytrain.row_kernel`` the *band kernel*, the same conv on
one window of ``k`` rows (``(1, C, k, W)``, the rows above and below the image
holding the input zero point) giving one output row ``(1, Co, 1, Wo)``.  The
planner then leaves the image out of the arena and gives the conv a window and
a band buffer instead (``_buffers.py``), and the C step function fills the
window from a row reader for each output row, runs the band kernel and stores
the band (``tvm_tinytrain/codegen/step.py``): the image can come from a camera
line by line, from flash, or from a file, and needs no RAM of its own.

A zero-point row contributes ``(x_zero - x_zero) * w = 0`` to each sum, which
is what the padding contributes; the sums are integer, so the band kernel gives
the bits of the whole conv.  Where the image has another reader (the first
conv's weight gradient in a scheme that trains it), nothing changes.

Before::

    def train_step(input: R.Tensor((1, 3, 128, 128), "int8"), ...):
        lv = R.call_tir(cls.conv2d_requant, (input, w0, b0, c0, c1), R.Tensor((1, 16, 64, 64), "int8"))

After (``conv2d_requant_rows`` has ``tinytrain.row_kernel``: ``(1, 3, 3, 128) -> (1, 16, 1, 64)``)::

        lv = R.call_tir(cls.conv2d_requant_rows, (input, w0, b0, c0, c1), R.Tensor((1, 16, 64, 64), "int8"))
"""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_tinytrain.relax_build import kernel_attrs

from ._fusion import reader_positions, reemit, relax_function_names
from ._ir import decode, shape_of
from .config import option
from .fuse_conv_requant import conv_requant_func

ROW_KERNEL = "tinytrain.row_kernel"


def row_kernel(prim_func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """The band kernel a ``conv2d_requant_rows`` PrimFunc carries."""
    return prim_func.attrs[ROW_KERNEL]


def window_shape(call) -> tuple[int, int, int, int]:
    """The band kernel's input: ``k`` rows of every channel of the image."""
    n, c, _, w = shape_of(call.args[0])
    return (n, c, shape_of(call.args[1])[2], w)


def _streamable(mod, func: relax.Function):
    """The call that alone reads the image of ``func``, when it is a conv2d_requant on it; else None."""
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
    return call


def rows_kernel(mod: tvm.IRModule, call) -> tvm.tirx.PrimFunc:
    """``call``'s PrimFunc as ``conv2d_requant_rows``, carrying its band kernel."""
    types = [(window_shape(call), "int8"), *[(shape_of(a), str(a.ty.dtype)) for a in call.args[1:]]]
    band = conv_requant_func(call.attrs, types, call.args[-1], pad_h=0)
    attrs = {k: v for k, v in call.attrs.items() if k != "node"}
    return mod[call.gvar].with_attrs(kernel_attrs("conv2d_requant_rows", call.node, **attrs)).with_attr(ROW_KERNEL, band)


@tvm.transform.module_pass(opt_level=0, name="StreamInputRows")
class StreamInputRows:
    """Re-emit the first conv of each Relax function as ``conv2d_requant_rows`` where it alone reads the image
    (option ``stream_input``; run after the fusions, before PlanMemory)."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = enabled

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not option("stream_input", self.enabled):
            return mod
        for name in relax_function_names(mod):
            call = _streamable(mod, mod[name])
            if call is None:
                continue
            prim = rows_kernel(mod, call)

            def emit(bb, binding, call=call, prim=prim) -> bool:
                if not binding.var.same_as(call.var):
                    return False
                gv = bb.add_func(prim, "conv2d_requant_rows")
                bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(relax.call_tir(gv, relax.Tuple(call.args), binding.var.ty))))
                return True

            mod = reemit(mod, name, emit)
        return mod
