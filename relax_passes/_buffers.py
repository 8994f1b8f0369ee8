"""The buffers of a training step and when each is alive: shared by ReorderUpdates and PlanMemory.

A buffer is one tensor a kernel writes (each field of a multi-output kernel
is its own buffer), plus each kernel's internal workspace (its PrimFunc's
intermediate stages over 1 KB, option ``kernel_local_bytes``, ``{var}.workspace``), alive only while it runs:
the C kernel takes it as its last argument and keeps those buffers there, so
they are arena bytes, not stack; its smaller buffers are C locals
(``tvm_tinytrain/codegen/kernels.py``).  ``TupleGetItem`` and plain
var-to-var bindings alias a buffer.  SGD updates write in place into their
parameter, so they allocate nothing.  A kernel of :data:`OVERWRITING_OPS`
whose operand dies at that kernel writes over the operand: its output
buffer is an ``alias`` of the operand's storage.  The image, label and learning rate are
arena buffers, except an image that only a streamed layer reads (StreamInputRows): it is
``streamed``, read a window of rows at a time into that layer's ``.window`` buffer, and takes no
arena space.  So are the outputs of the streamed layers but the last of each pipeline: each has a
``.ring`` of rows instead (``_row_pipeline.py``); a pipeline's rings, windows and band buffer are alive
from its first binding to its last, where the C step function runs it.  Trainable parameters live in
RAM outside the arena; frozen parameters and constants live in flash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tvm import relax

from tvm_tinytrain.model import DTYPE_BYTES

from ._ir import decode
from ._row_pipeline import ROW_OPS, row_pipelines
from .config import option

SGD_OPS = ("sgd_update_int8", "sgd_update_int32", "sgd_update_f32")
# Kernels that overwrite their argument 0 (a trainable parameter) instead of allocating an output.
IN_PLACE_OPS = (*SGD_OPS, "conv2d_weight_grad_sgd")
# Kernels whose output may overwrite an operand that dies there: element-wise ones (out[i] reads index i only)
# the depthwise kernels that stage each operand plane first (DepthwiseInPlace), the 1x1 convs that stage each
# pixel's column first (PointwiseInPlace) and the residual block backward that copies the rows of its operand it still
# needs before it writes a band (ResidualBackwardInPlace).
OVERWRITING_OPS = ("apply_mask", "add_f32", "add_int8", "depthwise_in_place", "depthwise_input_grad_in_place", "pointwise_in_place",
                   "residual_block_backward")
# Overwriting kernels whose smaller output may also end where the operand ends: a 1x1 conv writes output (c, p) only
# after staging pixel p's column, and wherever the output starts inside the operand (a whole number of channel rows
# in), (c, p) lands on pixel p of some operand row.
TAIL_OVERWRITING_OPS = ("pointwise_in_place",)
PARAM_GRAD_OPS = ("conv2d_weight_grad", "bias_grad", "masked_bias_grad", "projection_bias_grad")
GRAD_OPS = ("apply_mask", "conv2d_input_grad", "depthwise_input_grad_in_place", "global_avg_pool_grad", "add_f32")


def in_place_fields(call) -> dict[int, int]:
    """Output fields of a multi-output kernel written over an argument (a trainable parameter): field -> argument,
    from the kernel's ``tinytrain.in_place`` attribute (e.g. the fused block backward's updated weight and biases)."""
    return {int(field): int(arg) for field, arg in call.attrs.get("in_place", ())}


def type_bytes(ty) -> int:
    return int(np.prod([int(d) for d in ty.shape])) * DTYPE_BYTES[str(ty.dtype)]


def _field_kind(op: str, index: int, ty) -> str:
    if op == "clamp_mask":
        return "mask"
    if op == "softmax_cross_entropy":
        return "activation" if index == 0 else "gradient"
    if op == "linear_float_grads":
        return "gradient" if index == 0 else "weight_gradient"
    if op in ("depthwise_block_backward", "depthwise_block_backward_sgd", "residual_block_backward"):  # an input gradient (4-D), or bias gradients
        return "gradient" if len(ty.shape) == 4 else "weight_gradient"
    if op in PARAM_GRAD_OPS:
        return "weight_gradient"
    if op in GRAD_OPS:
        return "gradient"
    return "activation"


@dataclass
class Buffer:
    name: str
    size: int
    start: int  # index of the binding that writes it (-1: a function input)
    end: int  # index of the last binding that reads it (len(bindings): a function output)
    kind: str  # input | activation | mask | gradient | weight_gradient | workspace
    offset: int | None = None
    alias: int | None = None  # index of the buffer whose storage this one reuses (it then takes no space of its own)
    streamed: bool = False  # the image, read in rows by its only reader: not in the arena
    overwrites: int | None = None  # a larger operand dying at this buffer's kernel, over which this one should lie
    tail_ok: bool = False  # ... or whose last bytes it may take instead (TAIL_OVERWRITING_OPS)

    def in_place_offsets(self, buffers: list[Buffer]) -> tuple[int, ...]:
        """Where this output lies over the operand it overwrites: at the operand's start, or flush with its end."""
        target = buffers[self.overwrites]
        return (target.offset, *([target.offset + target.size - self.size] if self.tail_ok else []))

    def in_place(self, buffers: list[Buffer]) -> bool:
        """Placed over the operand it overwrites: the two then share bytes at their kernel only, as it allows."""
        return (self.overwrites is not None and self.offset is not None and buffers[self.overwrites].offset is not None
                and self.offset in self.in_place_offsets(buffers))

    def overlaps_in_time(self, other: Buffer) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass
class StepBuffers:
    """Buffers of a function, its trainable and frozen parameters, and per-binding facts."""

    buffers: list[Buffer]
    trainable_bytes: int
    frozen_bytes: int
    bindings: list
    ops: list[str]  # kernel op per binding ('' for aliases and tuples)
    nodes: list[str]
    reads: list[set[int]] = field(default_factory=list)  # buffer ids read by each binding


def analyze(mod, func: relax.Function) -> StepBuffers:
    """Liveness of every buffer of ``func`` (a single dataflow block) in its current binding order."""
    bindings = list(func.body.blocks[0].bindings)
    attrs = func.attrs or {}
    ram_key = "tinytrain.ram_params" if "tinytrain.ram_params" in attrs else "tinytrain.updated_params"
    in_ram = {str(n) for n in attrs[ram_key]} if ram_key in attrs else set()  # parameters that must live in RAM
    num_input = int(attrs["num_input"]) if "num_input" in attrs else 1
    buffers: list[Buffer] = []
    root: dict[relax.Var, object] = {}  # var -> buffer index, tuple of indices, or None (not in the arena)
    trainable = frozen = 0
    for i, p in enumerate(func.params):
        if i < num_input:
            root[p] = len(buffers)
            buffers.append(Buffer(p.name, type_bytes(p.ty), -1, -1, "input"))
        else:
            root[p] = None
            if p.name in in_ram:
                trainable += type_bytes(p.ty)
            else:
                frozen += type_bytes(p.ty)

    stages = {s.binding: (pipe, s) for pipe in row_pipelines(mod, func) for s in pipe.stages}
    ops, nodes, reads = [], [], []
    overwriting: list[tuple[int, list[int], int, str]] = []  # (binding, operand buffers, output buffer, op)

    def use(expr, i, acc: set[int]):
        if isinstance(expr, relax.Var):
            r = root.get(expr)
            for b in (r if isinstance(r, tuple) else (r,)):
                if b is not None:
                    buffers[b].end = max(buffers[b].end, i)
                    acc.add(b)
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                use(f, i, acc)

    for i, binding in enumerate(bindings):
        value, var = binding.value, binding.var
        call = decode(mod, binding)
        acc: set[int] = set()
        if call is not None:
            for a in call.args:
                use(a, i, acc)
            first = last = i  # the workspace's lifetime
            if call.op in IN_PLACE_OPS:
                root[var] = None  # in place, into the parameter
            else:
                tys = list(var.ty.fields) if isinstance(var.ty, relax.TupleType) else [var.ty]
                idx = []
                fields_in_place = in_place_fields(call)
                for k, ty in enumerate(tys):
                    if k in fields_in_place:
                        idx.append(None)  # in place, into the parameter
                        continue
                    idx.append(len(buffers))
                    name = var.name if len(tys) == 1 else f"{var.name}[{k}]"
                    streamed = i in stages and stages[i][1] is not stages[i][0].stages[-1]
                    buffers.append(Buffer(name, type_bytes(ty), i, i, _field_kind(call.op, k, ty), streamed=streamed))
                root[var] = idx[0] if len(idx) == 1 else tuple(idx)
                if call.op in OVERWRITING_OPS:
                    overwriting.append((i, [root[a] for a in call.args if isinstance(root.get(a), int)], idx[0], call.op))
                if i in stages:  # a streamed layer: its rows' buffers, and its band kernel's workspace, alive while its pipeline runs
                    pipe, stage = stages[i]
                    first, last = pipe.first, pipe.last
                    for part, size in pipe.buffers(stage):
                        buffers.append(Buffer(f"{var.name}.{part}", size, first, last, "workspace"))
            ws = kernel_workspace_bytes(mod[call.gvar], call.gvar.name_hint)  # in-place kernels too: their C takes one as well
            if ws:
                buffers.append(Buffer(f"{var.name}.workspace", ws, first, last, "workspace"))
        elif isinstance(value, relax.TupleGetItem):  # an alias of one field: the reader is its consumer
            r = root.get(value.tuple_value)
            root[var] = r[value.index] if isinstance(r, tuple) else r
        elif isinstance(value, relax.Var):
            root[var] = root.get(value)
        else:
            use(value, i, acc)
        ops.append(call.op if call is not None else "")
        nodes.append(call.node if call is not None else "")
        reads.append(acc)
    use(func.body.body, len(bindings), set())
    if num_input and buffers[0].end < len(bindings):
        readers = [i for i, r in enumerate(reads) if 0 in r]
        buffers[0].streamed = bool(readers) and all(ops[i] in ROW_OPS for i in readers)
    _alias_overwriting_outputs(buffers, overwriting)
    return StepBuffers(buffers, trainable, frozen, bindings, ops, nodes, reads)


def _alias_overwriting_outputs(buffers: list[Buffer], overwriting) -> None:
    """Let each such output reuse an operand that dies at its kernel.

    An output as large as the operand shares its storage (an alias: the storage's lifetime grows to cover it).  A
    smaller one only asks for a place over the operand (``overwrites``: its start, or flush with its end where the
    kernel allows, ``tail_ok``), so the rest of the operand is free once the kernel is done: sharing the whole
    storage would keep it alive as long as the output, e.g. a block's projection output saved for the backward
    would hold the six times larger expanded tensor's bytes.
    """
    for i, operands, out, op in overwriting:
        for b in operands:
            if buffers[b].end == i and buffers[b].size >= buffers[out].size and buffers[b].kind == buffers[out].kind:
                storage = buffers[b].alias if buffers[b].alias is not None else b
                if buffers[b].size == buffers[out].size:
                    buffers[out].alias = storage
                    buffers[storage].end = max(buffers[storage].end, buffers[out].end)
                elif buffers[storage].end == i:  # no alias of the operand outlives the kernel
                    buffers[out].overwrites = storage
                    buffers[out].tail_ok = op in TAIL_OVERWRITING_OPS
                break


def storage_buffers(buffers: list[Buffer]) -> list[Buffer]:
    """The buffers that take arena space (aliases share another's; a streamed image has none)."""
    return [b for b in buffers if b.alias is None and not b.streamed]


def kernel_workspace_bytes(prim_func, name: str) -> int:
    """Bytes of the workspace a kernel's C form keeps its internal buffers over ``kernel_local_bytes`` in (a streamed layer's: its band kernel's),
    alignment included, after TVM compacts them to what each loop needs (e.g. the accumulator of a fused conv +
    requantize shrinks to one int32): the code generator places them with the same function."""
    from tvm_tinytrain.codegen.kernels import workspace_bytes  # imported here: the code generator imports this module

    return workspace_bytes(prim_func, name, int(option("kernel_local_bytes")))


def live_span(b: Buffer, buffers: list[Buffer], n: int) -> tuple[int, int] | None:
    """The first and last of the ``n`` bindings at which ``b``'s own bytes are alive; None for a buffer without
    storage of its own (an alias, the streamed image)."""
    if b.alias is not None or b.streamed:
        return None
    first = b.start + 1 if b.in_place(buffers) else b.start  # at its kernel it is the operand's bytes
    return max(first, 0), min(b.end, n - 1)


def live_bytes_timeline(sb: StepBuffers) -> list[dict[str, int]]:
    """Per binding: bytes alive while it runs, by buffer kind."""
    n = len(sb.bindings)
    timeline = [dict.fromkeys(("input", "activation", "mask", "gradient", "weight_gradient", "workspace"), 0) for _ in range(n)]
    for b in storage_buffers(sb.buffers):
        first, last = live_span(b, sb.buffers, n)
        for t in range(first, last + 1):
            timeline[t][b.kind] += b.size
    return timeline
