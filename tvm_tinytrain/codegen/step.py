"""The training step and inference as plain C over one static arena: ``generate(mod, out_dir)``.

``tinytrain_model.c`` replays ``train_step`` / ``infer`` binding by binding: each
kernel call gets ``tinytrain_arena + offset`` for every buffer the memory plan
placed (``TupleGetItem``, tuples and var-to-var bindings resolved to the buffer
they alias), the parameter arrays by name, and ``static const`` arrays for the
graph's constants; a kernel with internal buffers over ``kernel_local_bytes``
gets its planned ``{var}.workspace`` slot as its last argument (see kernels.py),
so only its smaller buffers are on the stack.  SGD updates write in place: the kernel's output pointer is
the parameter's RAM array, so nothing may read a parameter after its update
(ReorderUpdates guarantees it; we check).  The two functions never run at the
same time, so they share the arena, sized for the larger plan.

The image comes from a row reader (``tinytrain_train_step_rows``; the
pointer forms read an image in memory through one).  Where StreamInputRows
streamed it, the streamed layers run one output row at a time (a loop per
pipeline, ``relax_passes/_row_pipeline.py``): the reader fills the first
layer's window, each band kernel computes a row into its ring slot, and the
last layer's rows are stored in its output; otherwise the reader fills the
arena's image buffer.

Trainable parameters (``tinytrain.updated_params``) are RAM arrays filled from
``static const`` initial values by ``tinytrain_init``; every other parameter and
every constant is ``static const`` (flash).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from relax_passes import memory_plan, pass_config
from relax_passes._buffers import IN_PLACE_OPS, in_place_fields, type_bytes
from relax_passes._ir import decode, shape_of
from relax_passes._row_pipeline import IMAGE, RowPipeline, row_pipelines
from relax_passes.plan_memory import plan
from tvm_tinytrain.errors import TinyTrainError

from .kernels import C_TYPES, WORKSPACE_SLOT_ALIGN, Kernel, KernelLibrary, c_float, emit


@dataclass(frozen=True)
class Arena:
    """A planned buffer: ``tinytrain_arena + offset``."""

    offset: int
    dtype: str
    size: int


@dataclass(frozen=True)
class Streamed:
    """The image, read in rows by the only kernel that reads it: it has no storage."""

    dtype: str
    size: int


@dataclass(frozen=True)
class Symbol:
    """A C array: a parameter (RAM when trainable) or a constant (flash)."""

    name: str
    dtype: str
    const: bool
    param: str = ""  # the Relax parameter it holds ('' for a constant)


def c_name(name: str) -> str:
    return "tt_" + re.sub(r"\W", "_", name)


class Storage:
    """Every C array the step uses: parameters by Relax name, constants deduplicated by value."""

    def __init__(self, init: dict[str, np.ndarray], trainable: list[str]):
        self.init = init
        self.trainable = trainable
        self.params: dict[str, Symbol] = {}
        self.constants: dict[tuple, tuple[Symbol, np.ndarray]] = {}
        self._names: set[str] = set()
        for name in trainable:
            self.param(name)

    def _claim(self, name: str, what: str) -> str:
        cname = c_name(name)
        if cname in self._names:
            raise TinyTrainError(f"codegen: {what} and another array would both be called {cname} in C")
        self._names.add(cname)
        return cname

    def param(self, name: str) -> Symbol:
        if name not in self.params:
            if name not in self.init:
                raise TinyTrainError(f"codegen: parameter {name!r} has no initial value in tinytrain.param_init")
            self.params[name] = Symbol(self._claim(name, f"parameter {name!r}"), str(self.init[name].dtype), name not in self.trainable, name)
        return self.params[name]

    def constant(self, const: tvm.ir.Constant) -> Symbol:
        value = const.value.numpy()
        key = (str(value.dtype), value.tobytes())
        if key not in self.constants:
            name = f"const_{len(self.constants)}"
            self.constants[key] = (Symbol(self._claim(name, f"constant {name}"), str(value.dtype), True), value)
        return self.constants[key][0]

    def frozen(self) -> list[Symbol]:
        return [s for s in self.params.values() if s.const]

    def bytes_of(self, sym: Symbol) -> int:
        return int(self.init[sym.param].nbytes)


class PlannedBuffers:
    """The memory plan's buffers in analysis order, taken one by one as the walk meets them (names repeat)."""

    def __init__(self, rows: list[dict], func: str):
        self.rows, self.func, self.next = rows, func, 0

    def take(self, name: str, ty) -> Arena | Streamed:
        return self.take_bytes(name, str(ty.dtype), type_bytes(ty))

    def take_bytes(self, name: str, dtype: str, size: int) -> Arena | Streamed:
        row = self.rows[self.next] if self.next < len(self.rows) else None
        if row is None or row["name"] != name or row["size"] != size:
            raise TinyTrainError(f"codegen: {self.func}: buffer {name} ({size} bytes) does not match the memory plan's next buffer {row}")
        self.next += 1
        return Streamed(dtype, size) if row.get("streamed") else Arena(int(row["offset"]), dtype, size)

    def take_workspace(self, var_name: str, kernel: Kernel) -> Arena | None:
        """The slot planned for the internal buffers of ``kernel``'s call that writes ``var_name`` (None: it has none)."""
        name = f"{var_name}.workspace"
        row = self.rows[self.next] if self.next < len(self.rows) else None
        planned = int(row["size"]) if row is not None and row["name"] == name else 0
        what = f"codegen: {self.func}: kernel {kernel.symbol} ({kernel.prim_func}) for {var_name}"
        if kernel.workspace_bytes > planned:
            raise TinyTrainError(f"{what} keeps {kernel.workspace_bytes} bytes of internal buffers, but the memory plan reserved "
                                 f"{planned} for {name}")
        if planned and not kernel.workspace_bytes:
            raise TinyTrainError(f"{what} has no internal buffers, but the memory plan reserved {planned} bytes for {name}")
        if not planned:
            return None
        slot = self.take_bytes(name, "int8", planned)
        if slot.offset % WORKSPACE_SLOT_ALIGN:
            raise TinyTrainError(f"{what}: the memory plan put {name} at offset {slot.offset}, not a multiple of {WORKSPACE_SLOT_ALIGN}")
        return slot

    def finish(self) -> None:
        if self.next != len(self.rows):
            raise TinyTrainError(f"codegen: {self.func}: the memory plan has buffers the function never writes: {self.rows[self.next:]}")


@dataclass
class Lowered:
    """One Relax function as C statements, its arena inputs by name and where its result lives."""

    calls: list[str]
    inputs: dict[str, Arena]
    result: object


def pointer(loc, dtype: str, what: str) -> str:
    """The C argument for a location, typed as the kernel parameter expects."""
    if not isinstance(loc, (Arena, Symbol)):
        raise TinyTrainError(f"codegen: {what}: expected one tensor, found a tuple")
    if loc.dtype != dtype:
        raise TinyTrainError(f"codegen: {what}: the tensor holds {loc.dtype}, the kernel expects {dtype}")
    ctype = C_TYPES[dtype]
    if isinstance(loc, Arena):
        return f"({ctype} *)(tinytrain_arena + {loc.offset})"
    return f"({ctype} *){loc.name}" if loc.const else loc.name  # kernels take non-const pointers; they never write inputs


def profile_ops(lib: KernelLibrary) -> list[str]:
    """The kernel kinds, in a fixed order: ``TINYTRAIN_PROFILE`` builds count instructions per kind."""
    return sorted({k.op for k in lib.kernels.values()})


def _kernel_call(kernel: Kernel, locs: list, workspace: Arena | None, index: int, func: str, var, op_id: int) -> str:
    what = f"{func} binding {index} ({var.name} = {kernel.op} of {kernel.node or '?'}, {kernel.symbol})"
    if len(locs) != len(kernel.dtypes):
        raise TinyTrainError(f"codegen: {what}: {len(locs)} buffers for a kernel with {len(kernel.dtypes)} parameters")
    return _render_call(kernel, [pointer(loc, dt, f"{what} argument {k}") for k, (loc, dt) in enumerate(zip(locs, kernel.dtypes))],
                        workspace, index, var, op_id)


def _render_call(kernel: Kernel, args: list[str], workspace: Arena | None, index: int, var, op_id: int) -> str:
    if workspace is not None:
        args = [*args, pointer(workspace, "int8", f"the workspace of {kernel.symbol}")]
    joined = ",\n      ".join(args)
    return f"  /* {index}: {kernel.op} {kernel.node} -> {var.name} */\n  TT_PROFILED({op_id}, {kernel.symbol}({joined}));"


def _arena_at(loc: Arena, row_offset: str) -> str:
    return f"(int8_t *)(tinytrain_arena + {loc.offset} + {row_offset})"


def _gather(ring: Arena, slots: int, shape: tuple[int, int, int], window: Arena, first: str, inp, c0: str, count: int, what: str) -> str:
    """The C that gathers a window of ``inp.rows`` rows from ``first`` of ``count`` channels from ``c0`` of a ring of
    ``slots`` rows of ``shape`` (channels, height, width)."""
    c, h, w = shape
    return (f"tinytrain_ring_window({pointer(ring, 'int8', what)}, {slots}, {c}, {h}, {w}, {pointer(window, 'int8', what)}, "
            f"{first}, {inp.rows}, {inp.zero}, {c0}, {count});")


def _pipeline(pipe: RowPipeline, locs: dict[int, dict], kernels: dict[int, Kernel], op_ids: dict[str, int], func: str) -> str:
    """The C loop of a pipeline of streamed layers (``relax_passes/_row_pipeline.py``): each time, the last layer
    that can make its next row makes it, reading the image, its input's ring slot or a window gathered from the
    ring, and writing its row into its ring slot (the last layer: into its output)."""
    n, last = len(pipe.stages), pipe.stages[-1]
    window, expanded = locs[0].get("window"), locs[0].get("expanded")
    lines = [f"  /* bindings {pipe.first}..{pipe.last}: {n} layer(s) streamed row by row, "
             f"{pipe.stages[0].call.node} .. {last.call.node} -> {last.call.var.name} */",
             "  {", f"    int32_t tt_made[{n}] = {{0}};", f"    while (tt_made[{n - 1}] < {last.shape[1]}) {{"]
    blocks = []

    def what_of(stage):
        return f"{func} binding {stage.binding} ({stage.call.var.name} = {stage.call.op} of {stage.call.node})"

    def params_of(j: int, grouped: bool) -> list[str]:
        """Stage ``j``'s kernel arguments after its inputs; a channel group's when ``grouped`` (each parameter holds its
        channels' elements one channel after the other)."""
        stage, loc, kernel = pipe.stages[j], locs[j], kernels[j]
        if len(kernel.dtypes) != len(stage.call.args) + 1:
            raise TinyTrainError(f"codegen: {what_of(stage)}: {len(stage.call.args) + 1} buffers for a kernel with {len(kernel.dtypes)} parameters")
        params = [(pointer(a, dt, f"{what_of(stage)} argument {k}"), arg)
                  for k, (a, dt, arg) in enumerate(zip(loc["args"], kernel.dtypes, stage.call.args)) if k >= len(stage.inputs)]
        return [f"({p} + (size_t)tt_c * {int(np.prod(shape_of(arg)[1:]))})" if grouped else p for p, arg in params]

    for j, stage in enumerate(pipe.stages):
        if stage.recomputed:  # its reader makes its rows (below)
            continue
        loc, kernel = locs[j], kernels[j]
        what = what_of(stage)
        body, tensors = [], []
        # A depthwise conv whose window is gathered channel group by group: its kernel runs once per group, on that
        # group's window, weights, bias, multiplier, shift and output channels.
        grouped = stage.grouped
        c0 = "tt_c" if grouped else "0"
        for inp in stage.inputs:
            first = f"tt_row * {inp.stride} - {inp.pad}"
            if inp.source == IMAGE:
                body.append(f"if (tinytrain_read_window(read, ctx, {pointer(window, 'int8', what)}, {first}, {inp.rows}, {inp.zero}) != 0) {{\n"
                            f"  return 2;\n}}")
                tensors.append(pointer(window, "int8", what))
                continue
            src = pipe.stages[inp.source]
            ring = locs[inp.source]["ring"]
            c_in, h_in, w_in = src.shape
            if inp.rows == 1:
                tensors.append(_arena_at(ring, f"(size_t)(({first}) % {src.ring_rows}) * {src.row_bytes}"))
                continue
            if inp.via is None:
                body.append(_gather(ring, src.ring_rows, src.shape, window, first, inp, c0, stage.group if grouped else c_in, what))
            else:
                # The expansion's rows of this channel group, made from the narrow rows the window covers into the
                # expanded buffer (row r in slot r % rows), then gathered like a ring's.
                exp = pipe.stages[inp.via]
                count = stage.group if grouped else exp.shape[0]
                slot = f"(size_t)(tt_r % {inp.rows}) * {count * exp.shape[2]}"
                row = _render_call(kernels[inp.via], [_arena_at(ring, f"(size_t)(tt_r % {src.ring_rows}) * {src.row_bytes}"),
                                                       *params_of(inp.via, grouped), _arena_at(expanded, slot)],
                                   locs[inp.via]["workspace"], exp.binding, exp.call.var, op_ids[kernels[inp.via].op]).strip()
                body.append(f"for (int32_t tt_r = TT_MAX(0, {first}); tt_r < TT_MIN({exp.shape[1]}, {first} + {inp.rows}); tt_r++) {{\n"
                            + "\n".join("  " + line for line in row.split("\n")) + "\n}")
                body.append(_gather(expanded, inp.rows, (count, *exp.shape[1:]), window, first, inp, "0", count, what))
            tensors.append(pointer(window, "int8", what))
        out = pointer(loc["band"], "int8", what) if stage is last else \
            _arena_at(loc["ring"], f"(size_t)(tt_row % {stage.ring_rows}) * {stage.row_bytes}")
        if grouped:  # the output row holds its channels' elements one channel after the other
            out = f"({out} + (size_t)tt_c * {stage.shape[2]})"
        call = _render_call(kernel, [*tensors, *params_of(j, grouped), out], loc["workspace"], stage.binding, stage.call.var,
                            op_ids[kernel.op]).strip()
        body.append(call)
        if grouped:
            body = [f"for (int32_t tt_c = 0; tt_c < {stage.shape[0]}; tt_c += {stage.group}) {{",
                    *["  " + line for text in body for line in text.split("\n")], "}"]
        if stage is last:
            c, h, w = stage.shape
            body.append(f"tinytrain_store_row({pointer(loc['out'], 'int8', what)}, {pointer(loc['band'], 'int8', what)}, tt_row, {c}, {h}, {w});")
        ready = [f"tt_made[{j}] < {pipe.total_rows(j)}"]
        ready += [f"TT_MIN({pipe.stages[inp.source].shape[1]}, tt_made[{j}] * {inp.stride} - {inp.pad} + {inp.rows}) <= tt_made[{inp.source}]"
                  for inp in stage.inputs if inp.source != IMAGE]
        blocks.append([f"      if ({' && '.join(ready)}) {{", f"        int32_t tt_row = tt_made[{j}]++;",
                       *["        " + line for text in body for line in text.split("\n")], "        continue;", "      }"])
    for block in reversed(blocks):
        lines += block
    lines += ["      break;  /* never: row_pipelines replayed this schedule to the end */", "    }", "  }"]
    return "\n".join(lines)


def lower_function(mod: tvm.IRModule, func_name: str, rows: list[dict], storage: Storage, lib: KernelLibrary) -> Lowered:
    """Walk ``func_name``'s bindings like the planner did, giving every value a location and every kernel call its C."""
    func = mod[func_name]
    num_input = int(func.attrs["num_input"])
    buffers = PlannedBuffers(rows, func_name)
    where: dict = {}
    inputs = {}
    for i, p in enumerate(func.params):
        where[p] = inputs[p.name] = buffers.take(p.name, p.ty) if i < num_input else storage.param(p.name)
    inputs = {k: v for k, v in inputs.items() if isinstance(v, (Arena, Streamed))}
    params = set(func.params[num_input:])
    calls, updated = [], set()  # parameters already updated in place: their Relax Var (the old value) is gone
    op_ids = {op: k for k, op in enumerate(profile_ops(lib))}
    stages = {s.binding: (pipe, j) for pipe in row_pipelines(mod, func) for j, s in enumerate(pipe.stages)}
    row_locs: dict[int, dict[int, dict]] = {}  # pipeline -> stage -> its buffers' locations
    row_kernels: dict[int, dict[int, Kernel]] = {}

    def locate(expr, what):
        if isinstance(expr, tvm.ir.Constant):
            return storage.constant(expr)
        if expr not in where:
            raise TinyTrainError(f"codegen: {func_name}: {what} reads {expr}, which no earlier binding defines")
        if expr in params and expr.name in updated:
            raise TinyTrainError(f"codegen: {func_name}: {what} reads parameter {expr.name!r} after its in-place SGD update")
        return where[expr]

    for i, binding in enumerate(func.body.blocks[0].bindings):
        var, value = binding.var, binding.value
        call = decode(mod, binding)
        if call is not None:
            what = f"binding {i} ({var.name} = {call.op} of {call.node})"
            args = [locate(a, what) for a in call.args]
            kernel = lib.kernels[call.gvar.name_hint]
            if i in stages:
                pipe, j = stages[i]
                loc = row_locs.setdefault(id(pipe), {})[j] = {"args": args}
                where[var] = loc["out"] = buffers.take(var.name, var.ty)
                for part, size in pipe.buffers(pipe.stages[j]):
                    loc[part] = buffers.take_bytes(f"{var.name}.{part}", "int8", size)
                loc["workspace"] = buffers.take_workspace(var.name, kernel)
                row_kernels.setdefault(id(pipe), {})[j] = kernel
                if i == pipe.last:
                    calls.append(_pipeline(pipe, row_locs[id(pipe)], row_kernels[id(pipe)], op_ids, func_name))
                continue
            if any(isinstance(a, Streamed) for a in args):
                raise TinyTrainError(f"codegen: {func_name}: {what} reads a streamed tensor, which only streamed layers may read")
            def in_place(arg: int):
                target = args[arg]
                if not (isinstance(target, Symbol) and not target.const):
                    raise TinyTrainError(f"codegen: {func_name}: {what} updates {target}, which is not a trainable parameter")
                updated.add(target.param)
                return target

            if call.op in IN_PLACE_OPS:
                outs = [in_place(0)]
            else:
                tys = list(var.ty.fields) if isinstance(var.ty, relax.TupleType) else [var.ty]
                names = [var.name] if len(tys) == 1 else [f"{var.name}[{k}]" for k in range(len(tys))]
                fields_in_place = in_place_fields(call)
                outs = [in_place(fields_in_place[k]) if k in fields_in_place else buffers.take(n, ty)
                        for k, (n, ty) in enumerate(zip(names, tys))]
            workspace = buffers.take_workspace(var.name, kernel)
            where[var] = tuple(outs) if isinstance(var.ty, relax.TupleType) else outs[0]
            calls.append(_kernel_call(kernel, args + outs, workspace, i, func_name, var, op_ids[kernel.op]))
        elif isinstance(value, relax.TupleGetItem):
            where[var] = where[value.tuple_value][value.index]
        elif isinstance(value, relax.Tuple):
            where[var] = tuple(where[f] for f in value.fields)  # the result tuple names the updated parameters: no read
        elif isinstance(value, relax.Var):
            where[var] = where[value]
        else:
            raise TinyTrainError(f"codegen: {func_name}: binding {i} ({var.name}) is a {type(value).__name__}, not a kernel call or an alias")
    buffers.finish()
    return Lowered(calls, inputs, where[func.body.body])


def _expect_inputs(lowered: Lowered, func: str, expected: dict[str, tuple[str, int]]) -> None:
    """The C API writes the image (unless streamed), label and lr into these arena buffers: their order, dtypes and sizes are fixed."""
    got = {k: (v.dtype, v.size) for k, v in lowered.inputs.items()}
    if got != expected or list(got) != list(expected):
        raise TinyTrainError(f"codegen: {func} must take inputs {expected} (dtype, bytes), found {got}")


def _result(loc, func: str, size: int) -> Arena:
    if not (isinstance(loc, Arena) and loc.dtype == "float32" and loc.size == size):
        raise TinyTrainError(f"codegen: {func} must produce a float32 tensor of {size} bytes in the arena, found {loc}")
    return loc


# ---------------------------------------------------------------- C text
def c_values(values: np.ndarray, what: str) -> list[str]:
    flat = values.reshape(-1)
    if flat.dtype == np.float32:
        return [c_float(v, what) for v in flat.tolist()]
    if flat.dtype not in (np.int8, np.uint8, np.int32, np.int64):
        raise TinyTrainError(f"codegen: {what} has dtype {flat.dtype}, which the C arrays do not support")
    lowest = np.iinfo(flat.dtype).min
    return [f"({v + 1} - 1)" if v == lowest and flat.dtype.itemsize >= 4 else str(v) for v in flat.tolist()]


def c_array(decl: str, values: np.ndarray, what: str, per_line: int = 16) -> str:
    items = c_values(values, what)
    rows = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return f"{decl}[{len(items)}] = {{\n  " + ",\n  ".join(rows) + "\n};"


@dataclass
class Layout:
    """Everything the C files need besides the calls."""

    num_classes: int
    input_shape: tuple[int, int, int]
    arena_bytes: int
    trainable: list[Symbol]
    storage: Storage
    lr: float
    peak_sram_bytes: int  # the planner's: train_step arena + trainable parameters
    max_workspace_bytes: int  # the largest kernel workspace (its internal buffers): an arena slot, counted in arena_bytes
    max_local_bytes: int  # the largest kernel locals (its internal buffers of at most 1 KB): on the stack, not in the arena
    streams_input: bool  # the image is read in windows of rows (StreamInputRows), in train_step and infer

    def trainable_bytes(self) -> int:
        return sum(self.storage.bytes_of(s) for s in self.trainable)

    def frozen_param_bytes(self) -> int:
        return sum(self.storage.bytes_of(s) for s in self.storage.frozen())

    def constant_bytes(self) -> int:
        return sum(int(v.nbytes) for _, v in self.storage.constants.values())


def header(layout: Layout, model_name: str, scheme: str, ops: list[str]) -> str:
    c, h, w = layout.input_shape
    st = layout.storage
    per_param = "\n".join(f" *   {'RAM  ' if not s.const else 'flash'} {s.param:<40} {str(st.init[s.param].dtype):<8} "
                          f"{str(list(st.init[s.param].shape)):<18} {st.bytes_of(s):>8} B" for s in [*layout.trainable, *st.frozen()])
    sizes = "\n".join(f" *   {label:<72} {value:>8}" for label, value in [
        (f"arena (activations, masks, gradients{'' if layout.streams_input else ', image'}; shared by train and infer)", layout.arena_bytes),
        ("trainable parameters (RAM)", layout.trainable_bytes()),
        ("frozen parameters (flash)", layout.frozen_param_bytes()),
        ("constants: requantization and QAS scales (flash)", layout.constant_bytes()),
        ("initial values of the trainable parameters (flash)", layout.trainable_bytes()),
        ("planned peak SRAM of train_step (its arena + trainable parameters)", layout.peak_sram_bytes),
        ("largest kernel workspace (internal buffers; an arena slot, in the arena above)", layout.max_workspace_bytes),
        ("largest kernel locals (internal buffers of at most 1 KB; on the stack)", layout.max_local_bytes),
    ])
    return f"""/* tinytrain_model.h: on-device int8 training of {model_name} (scheme {scheme}), generated by tvm_tinytrain.codegen.
 *
 * Sizes (bytes):
{sizes}
 *
 * Parameters:
{per_param}
 */
#ifndef TINYTRAIN_MODEL_H
#define TINYTRAIN_MODEL_H

#include <stdint.h>

#define TINYTRAIN_INPUT_C {c}
#define TINYTRAIN_INPUT_H {h}
#define TINYTRAIN_INPUT_W {w}
#define TINYTRAIN_INPUT_BYTES {c * h * w}
#define TINYTRAIN_NUM_CLASSES {layout.num_classes}
#define TINYTRAIN_ARENA_BYTES {layout.arena_bytes}
#define TINYTRAIN_TRAINABLE_BYTES {layout.trainable_bytes()}
#define TINYTRAIN_NUM_TRAINABLE {len(layout.trainable)}

typedef struct {{ const char *name; void *data; uint32_t bytes; const char *dtype; }} tinytrain_param_t;
extern const tinytrain_param_t tinytrain_params[TINYTRAIN_NUM_TRAINABLE];

int tinytrain_init(void);                /* copy the trainable parameters' initial values (const, flash) into RAM; 0 = ok */
void tinytrain_set_lr(float lr);         /* default {layout.lr!r} */
/* A row reader writes row `row` of channel `channel` of the image (TINYTRAIN_INPUT_W int8 values, NCHW) to dst and
 * returns 0, or nonzero when it cannot.  The step asks for each row when it needs it, some rows twice, so the image
 * can come from a camera, a file or flash without an image-sized buffer in RAM. */
typedef int (*tinytrain_row_reader_t)(void *ctx, int32_t channel, int32_t row, int8_t *dst);
#define TINYTRAIN_STREAMS_INPUT {int(layout.streams_input)}  /* 1: the image is read in windows of rows, never held whole */

/* 0 = ok, 1 = label out of range, 2 = the reader failed (nothing was updated). */
int tinytrain_train_step_rows(tinytrain_row_reader_t read, void *ctx, int32_t label, float *loss);
int tinytrain_infer_rows(tinytrain_row_reader_t read, void *ctx, float *logits);   /* logits[TINYTRAIN_NUM_CLASSES] */
/* The same on an NCHW image in memory (RAM or flash), read where it is. */
int tinytrain_train_step(const int8_t *input, int32_t label, float *loss);
int tinytrain_infer(const int8_t *input, float *logits);

#ifdef TINYTRAIN_PROFILE
/* Built with -DTINYTRAIN_PROFILE: each kernel call adds the clock's advance to its kind's count (clock NULL: off). */
#define TINYTRAIN_PROFILE_OPS {len(ops)}
extern const char *const tinytrain_profile_ops[TINYTRAIN_PROFILE_OPS];
extern uint64_t tinytrain_profile_counts[TINYTRAIN_PROFILE_OPS];
extern uint64_t (*tinytrain_profile_clock)(void);
#endif

#endif /* TINYTRAIN_MODEL_H */
"""


def _arrays(layout: Layout) -> str:
    st = layout.storage
    out = ["/* Trainable parameters: RAM, filled from their flash initial values by tinytrain_init(). */"]
    for s in layout.trainable:
        value = st.init[s.param]
        out.append(f"static {C_TYPES[s.dtype]} {s.name}[{value.size}];")
        out.append(c_array(f"static const {C_TYPES[s.dtype]} {s.name}_init", value, f"parameter {s.param!r}"))
    out.append("\n/* Frozen parameters (flash). */")
    out += [c_array(f"static const {C_TYPES[s.dtype]} {s.name}", st.init[s.param], f"parameter {s.param!r}") for s in st.frozen()]
    out.append("\n/* Constants of the graph: requantization multipliers and shifts, QAS scales (flash). */")
    out += [c_array(f"static const {C_TYPES[s.dtype]} {s.name}", value, f"constant {s.name}") for s, value in st.constants.values()]
    return "\n".join(out)


def source(layout: Layout, lib: KernelLibrary, train: Lowered, infer: Lowered) -> str:
    label, lr = train.inputs["label"], train.inputs["lr"]
    loss = _result(train.result[0], "train_step (loss)", 4)
    logits = _result(infer.result, "infer", 4 * layout.num_classes)
    table = ",\n".join(f'  {{"{s.param}", {s.name}, {layout.storage.bytes_of(s)}u, "{s.dtype}"}}' for s in layout.trainable)
    inits = "\n".join(f"  memcpy({s.name}, {s.name}_init, sizeof {s.name});" for s in layout.trainable)
    protos = "\n".join(k.prototype for k in lib.kernels.values())
    return f"""/* tinytrain_model.c: the training step and inference over one static arena (see tinytrain_model.h).
 * Generated by tvm_tinytrain.codegen; do not edit.  Kernels are in tinytrain_kernels.c. */
#include <string.h>

#include "tinytrain_model.h"

{protos}

#ifdef TINYTRAIN_PROFILE
const char *const tinytrain_profile_ops[TINYTRAIN_PROFILE_OPS] = {{{", ".join(f'"{op}"' for op in profile_ops(lib))}}};
uint64_t tinytrain_profile_counts[TINYTRAIN_PROFILE_OPS];
uint64_t (*tinytrain_profile_clock)(void);
#define TT_PROFILED(op, ...) do {{ \\
    uint64_t tt_start = tinytrain_profile_clock ? tinytrain_profile_clock() : 0; \\
    __VA_ARGS__; \\
    if (tinytrain_profile_clock) tinytrain_profile_counts[op] += tinytrain_profile_clock() - tt_start; \\
  }} while (0)
#else
#define TT_PROFILED(op, ...) __VA_ARGS__
#endif

static uint8_t tinytrain_arena[TINYTRAIN_ARENA_BYTES] __attribute__((aligned(16)));
static float tinytrain_lr = {c_float(float(np.float32(layout.lr)), "lr")};

{_arrays(layout)}

const tinytrain_param_t tinytrain_params[TINYTRAIN_NUM_TRAINABLE] = {{
{table}
}};

int tinytrain_init(void) {{
{inits}
  return 0;
}}

void tinytrain_set_lr(float lr) {{
  tinytrain_lr = lr;
}}

/* Rows first_row .. first_row + rows - 1 of every channel into window[channel][rows][W]; rows outside the image hold
 * the input zero point, which adds nothing to a conv's sums, as its padding does. */
static int tinytrain_read_window(tinytrain_row_reader_t read, void *ctx, int8_t *window, int32_t first_row, int32_t rows, int8_t zero) {{
  for (int32_t c = 0; c < TINYTRAIN_INPUT_C; c++) {{
    for (int32_t r = 0; r < rows; r++) {{
      int8_t *dst = window + ((size_t)c * rows + r) * TINYTRAIN_INPUT_W;
      int32_t row = first_row + r;
      if (row < 0 || row >= TINYTRAIN_INPUT_H) {{
        memset(dst, zero, TINYTRAIN_INPUT_W);
      }} else if (read(ctx, c, row, dst) != 0) {{
        return -1;
      }}
    }}
  }}
  return 0;
}}

/* The row reader of an image in memory: ctx is the image. */
static int tinytrain_image_rows(void *ctx, int32_t channel, int32_t row, int8_t *dst) {{
  memcpy(dst, (const int8_t *)ctx + ((size_t)channel * TINYTRAIN_INPUT_H + row) * TINYTRAIN_INPUT_W, TINYTRAIN_INPUT_W);
  return 0;
}}
{_store_row() if layout.streams_input else ""}
int tinytrain_train_step_rows(tinytrain_row_reader_t read, void *ctx, int32_t label, float *loss) {{
  if (label < 0 || label >= TINYTRAIN_NUM_CLASSES) {{
    return 1;
  }}
{_load_image(train.inputs["input"])}  memcpy(tinytrain_arena + {label.offset}, &label, sizeof label);
  memcpy(tinytrain_arena + {lr.offset}, &tinytrain_lr, sizeof tinytrain_lr);
{chr(10).join(train.calls)}
  if (loss) {{
    memcpy(loss, tinytrain_arena + {loss.offset}, sizeof *loss);
  }}
  return 0;
}}

int tinytrain_infer_rows(tinytrain_row_reader_t read, void *ctx, float *logits) {{
{_load_image(infer.inputs["input"])}{chr(10).join(infer.calls)}
  memcpy(logits, tinytrain_arena + {logits.offset}, TINYTRAIN_NUM_CLASSES * sizeof(float));
  return 0;
}}

int tinytrain_train_step(const int8_t *input, int32_t label, float *loss) {{
  return tinytrain_train_step_rows(tinytrain_image_rows, (void *)input, label, loss);
}}

int tinytrain_infer(const int8_t *input, float *logits) {{
  return tinytrain_infer_rows(tinytrain_image_rows, (void *)input, logits);
}}
"""


def _store_row() -> str:
    return """
#define TT_MIN(a, b) ((a) < (b) ? (a) : (b))
#define TT_MAX(a, b) ((a) > (b) ? (a) : (b))

/* Output row y of a streamed layer, computed as band[channel][width], into its place in out[channel][height][width]. */
static void tinytrain_store_row(int8_t *out, const int8_t *band, int32_t y, int32_t channels, int32_t height, int32_t width) {
  for (int32_t c = 0; c < channels; c++) {
    memcpy(out + ((size_t)c * height + y) * width, band + (size_t)c * width, width);
  }
}

/* Rows first_row .. first_row + rows - 1 of channels c0 .. c0 + count - 1 of a streamed tensor (row r in ring slot
 * r % slots, a slot being [channels][width]) into window[count][rows][width]; rows outside the tensor hold the
 * reader's zero point. */
static inline void tinytrain_ring_window(const int8_t *ring, int32_t slots, int32_t channels, int32_t height, int32_t width,
                                         int8_t *window, int32_t first_row, int32_t rows, int8_t zero, int32_t c0, int32_t count) {
  for (int32_t r = 0; r < rows; r++) {
    int32_t row = first_row + r;
    for (int32_t c = 0; c < count; c++) {
      int8_t *dst = window + ((size_t)c * rows + r) * width;
      if (row < 0 || row >= height) {
        memset(dst, zero, width);
      } else {
        memcpy(dst, ring + ((size_t)(row % slots) * channels + c0 + c) * width, width);
      }
    }
  }
}
"""


def _load_image(loc) -> str:
    """C that reads the whole image into the arena, unless it is streamed."""
    if isinstance(loc, Streamed):
        return ""
    return (f"  if (tinytrain_read_window(read, ctx, (int8_t *)(tinytrain_arena + {loc.offset}), 0, TINYTRAIN_INPUT_H, 0) != 0) {{\n"
            f"    return 2;\n  }}\n")


# ---------------------------------------------------------------- entry point
def generate(mod: tvm.IRModule, out_dir, lr: float = 0.003) -> dict:
    """Write ``tinytrain_model.h``, ``tinytrain_model.c``, ``tinytrain_kernels.c`` and ``tinytrain_meta.json``; return the meta."""
    step = mod["train_step"]
    trainable_names = [str(n) for n in step.attrs["tinytrain.updated_params"]]
    if not trainable_names:
        raise TinyTrainError("codegen: train_step updates no parameter")
    init = {str(k): v.numpy() for k, v in mod.attrs["tinytrain.param_init"].items()}
    train_plan = memory_plan(mod, "train_step")
    with pass_config(kernel_local_bytes=train_plan.kernel_local_bytes):  # the workspaces as train_step's plan sized them
        infer_plan = plan(mod, "infer")
    lib = emit(mod, ("train_step", "infer"), train_plan.kernel_local_bytes)
    storage = Storage(init, trainable_names)
    train = lower_function(mod, "train_step", train_plan.buffers, storage, lib)
    infer = lower_function(mod, "infer", infer_plan.buffers, storage, lib)
    shape = tuple(int(d) for d in step.params[0].ty.shape)
    num_classes = int(mod.attrs["tinytrain.num_classes"])
    _expect_inputs(train, "train_step", {"input": ("int8", int(np.prod(shape))), "label": ("int32", 4), "lr": ("float32", 4)})
    _expect_inputs(infer, "infer", {"input": ("int8", int(np.prod(shape)))})
    layout = Layout(num_classes, shape[1:], max(train_plan.arena_bytes, infer_plan.arena_bytes), [storage.params[n] for n in trainable_names],
                    storage, float(lr), train_plan.peak_sram_bytes, max(k.workspace_bytes for k in lib.kernels.values()),
                    max(k.local_bytes for k in lib.kernels.values()),
                    any(isinstance(f.inputs["input"], Streamed) for f in (train, infer)))
    model_name, scheme = str(mod.attrs["tinytrain.model_name"]), str(step.attrs["tinytrain.scheme"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tinytrain_kernels.c").write_text(lib.source)
    (out / "tinytrain_model.h").write_text(header(layout, model_name, scheme, profile_ops(lib)))
    (out / "tinytrain_model.c").write_text(source(layout, lib, train, infer))
    meta = _meta(layout, model_name, scheme, train_plan, infer_plan.arena_bytes, lib)
    # Where each `<weight>_trained` RAM slice sits in its full weight, for export after training.
    meta["trained_slices"] = json.loads(str(mod.attrs["tinytrain.trained_slices"])) if "tinytrain.trained_slices" in mod.attrs else {}
    (out / "tinytrain_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _meta(layout: Layout, model_name: str, scheme: str, train_plan, infer_arena: int, lib: KernelLibrary) -> dict:
    st = layout.storage
    report = train_plan.report()
    return {
        "model": model_name,
        "scheme": scheme,
        "num_classes": layout.num_classes,
        "input_shape": list(layout.input_shape),
        "lr": layout.lr,
        "arena_bytes": layout.arena_bytes,
        "train_arena_bytes": train_plan.arena_bytes,
        "infer_arena_bytes": infer_arena,
        "trainable_bytes": layout.trainable_bytes(),
        "frozen_param_bytes": layout.frozen_param_bytes(),
        "constant_bytes": layout.constant_bytes(),
        "trainable": [{"name": s.param, "dtype": s.dtype, "shape": list(st.init[s.param].shape), "bytes": st.bytes_of(s), "order": i}
                             for i, s in enumerate(layout.trainable)],
        "peak_sram_bytes": report["peak_sram_bytes"],
        "parts": report["parts"],
        "kernels": [{"symbol": k.symbol, "prim_func": k.prim_func, "op": k.op, "node": k.node, "workspace_bytes": k.workspace_bytes,
                     "local_bytes": k.local_bytes} for k in lib.kernels.values()],
    }
