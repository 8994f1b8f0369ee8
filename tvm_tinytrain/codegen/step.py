"""The training step and inference as plain C over one static arena: ``generate(mod, out_dir)``.

``tinytrain_model.c`` replays ``train_step`` / ``infer`` binding by binding: each
kernel call gets ``tinytrain_arena + offset`` for every buffer the memory plan
placed (``TupleGetItem``, tuples and var-to-var bindings resolved to the buffer
they alias), the parameter arrays by name, and ``static const`` arrays for the
graph's constants.  SGD updates write in place: the kernel's output pointer is
the parameter's RAM array, so nothing may read a parameter after its update
(ReorderUpdates guarantees it; we check).  The two functions never run at the
same time, so they share the arena, sized for the larger plan.

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

from relax_passes import memory_plan
from relax_passes._buffers import IN_PLACE_OPS, type_bytes
from relax_passes._ir import decode
from relax_passes.plan_memory import plan
from tvm_tinytrain.errors import TinyTrainError

from .kernels import C_TYPES, Kernel, KernelLibrary, c_float, emit


@dataclass(frozen=True)
class Arena:
    """A planned buffer: ``tinytrain_arena + offset``."""

    offset: int
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

    def take(self, name: str, ty) -> Arena:
        row = self.rows[self.next] if self.next < len(self.rows) else None
        size = type_bytes(ty)
        if row is None or row["name"] != name or row["size"] != size:
            raise TinyTrainError(f"codegen: {self.func}: buffer {name} ({size} bytes) does not match the memory plan's next buffer {row}")
        self.next += 1
        return Arena(int(row["offset"]), str(ty.dtype), size)

    def skip_workspace(self, var_name: str) -> None:
        """Kernel workspaces are stack arrays in the C kernels (see kernels.py), so their arena slot stays unused."""
        if self.next < len(self.rows) and self.rows[self.next]["name"] == f"{var_name}.workspace":
            self.next += 1

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


def _kernel_call(kernel: Kernel, locs: list, index: int, func: str, var, op_id: int) -> str:
    what = f"{func} binding {index} ({var.name} = {kernel.op} of {kernel.node or '?'}, {kernel.symbol})"
    if len(locs) != len(kernel.dtypes):
        raise TinyTrainError(f"codegen: {what}: {len(locs)} buffers for a kernel with {len(kernel.dtypes)} parameters")
    args = ",\n      ".join(pointer(loc, dt, f"{what} argument {k}") for k, (loc, dt) in enumerate(zip(locs, kernel.dtypes)))
    return f"  /* {index}: {kernel.op} {kernel.node} -> {var.name} */\n  TT_PROFILED({op_id}, {kernel.symbol}({args}));"


def lower_function(mod: tvm.IRModule, func_name: str, rows: list[dict], storage: Storage, lib: KernelLibrary) -> Lowered:
    """Walk ``func_name``'s bindings like the planner did, giving every value a location and every kernel call its C."""
    func = mod[func_name]
    num_input = int(func.attrs["num_input"])
    buffers = PlannedBuffers(rows, func_name)
    where: dict = {}
    inputs = {}
    for i, p in enumerate(func.params):
        where[p] = inputs[p.name] = buffers.take(p.name, p.ty) if i < num_input else storage.param(p.name)
    inputs = {k: v for k, v in inputs.items() if isinstance(v, Arena)}
    params = set(func.params[num_input:])
    calls, updated = [], set()  # parameters already updated in place: their Relax Var (the old value) is gone
    op_ids = {op: k for k, op in enumerate(profile_ops(lib))}

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
            if call.op in IN_PLACE_OPS:
                target = args[0]
                if not (isinstance(target, Symbol) and not target.const):
                    raise TinyTrainError(f"codegen: {func_name}: {what} updates {target}, which is not a trainable parameter")
                outs = [target]  # in place
                updated.add(target.param)
            else:
                tys = list(var.ty.fields) if isinstance(var.ty, relax.TupleType) else [var.ty]
                names = [var.name] if len(tys) == 1 else [f"{var.name}[{k}]" for k in range(len(tys))]
                outs = [buffers.take(n, ty) for n, ty in zip(names, tys)]
                buffers.skip_workspace(var.name)
            where[var] = tuple(outs) if isinstance(var.ty, relax.TupleType) else outs[0]
            kernel = lib.kernels[call.gvar.name_hint]
            calls.append(_kernel_call(kernel, args + outs, i, func_name, var, op_ids[kernel.op]))
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
    """The C API copies the image, label and lr into these arena buffers, so their order, dtypes and sizes are fixed."""
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
    max_stack_bytes: int  # the largest kernel-internal buffers, on the caller's stack

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
        ("arena (activations, masks, gradients, image; shared by train and infer)", layout.arena_bytes),
        ("trainable parameters (RAM)", layout.trainable_bytes()),
        ("frozen parameters (flash)", layout.frozen_param_bytes()),
        ("constants: requantization and QAS scales (flash)", layout.constant_bytes()),
        ("initial values of the trainable parameters (flash)", layout.trainable_bytes()),
        ("planned peak SRAM of train_step (its arena + trainable parameters)", layout.peak_sram_bytes),
        ("largest kernel-internal buffers (stack, besides the call frames)", layout.max_stack_bytes),
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
int tinytrain_train_step(const int8_t *input, int32_t label, float *loss);   /* 0 = ok, 1 = label out of range */
int tinytrain_infer(const int8_t *input, float *logits);                      /* logits[TINYTRAIN_NUM_CLASSES] */
int8_t *tinytrain_input_buffer(void);    /* the arena's image buffer: an image loaded here is not copied again */

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
    inp, label, lr = train.inputs["input"], train.inputs["label"], train.inputs["lr"]
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

int8_t *tinytrain_input_buffer(void) {{
  return (int8_t *)(tinytrain_arena + {inp.offset});
}}

int tinytrain_train_step(const int8_t *input, int32_t label, float *loss) {{
  if (label < 0 || label >= TINYTRAIN_NUM_CLASSES) {{
    return 1;
  }}
  if (input != tinytrain_input_buffer()) {{
    memcpy(tinytrain_arena + {inp.offset}, input, TINYTRAIN_INPUT_BYTES);
  }}
  memcpy(tinytrain_arena + {label.offset}, &label, sizeof label);
  memcpy(tinytrain_arena + {lr.offset}, &tinytrain_lr, sizeof tinytrain_lr);
{chr(10).join(train.calls)}
  if (loss) {{
    memcpy(loss, tinytrain_arena + {loss.offset}, sizeof *loss);
  }}
  return 0;
}}

int tinytrain_infer(const int8_t *input, float *logits) {{
  memmove(tinytrain_arena + {infer.inputs["input"].offset}, input, TINYTRAIN_INPUT_BYTES);  /* may be tinytrain_input_buffer() */
{chr(10).join(infer.calls)}
  memcpy(logits, tinytrain_arena + {logits.offset}, TINYTRAIN_NUM_CLASSES * sizeof(float));
  return 0;
}}
"""


# ---------------------------------------------------------------- entry point
def generate(mod: tvm.IRModule, out_dir, lr: float = 0.003) -> dict:
    """Write ``tinytrain_model.h``, ``tinytrain_model.c``, ``tinytrain_kernels.c`` and ``tinytrain_meta.json``; return the meta."""
    step = mod["train_step"]
    trainable_names = [str(n) for n in step.attrs["tinytrain.updated_params"]]
    if not trainable_names:
        raise TinyTrainError("codegen: train_step updates no parameter")
    init = {str(k): v.numpy() for k, v in mod.attrs["tinytrain.param_init"].items()}
    lib = emit(mod, ("train_step", "infer"))
    storage = Storage(init, trainable_names)
    train_plan, infer_plan = memory_plan(mod, "train_step"), plan(mod, "infer")
    train = lower_function(mod, "train_step", train_plan.buffers, storage, lib)
    infer = lower_function(mod, "infer", infer_plan.buffers, storage, lib)
    shape = tuple(int(d) for d in step.params[0].ty.shape)
    num_classes = int(mod.attrs["tinytrain.num_classes"])
    _expect_inputs(train, "train_step", {"input": ("int8", int(np.prod(shape))), "label": ("int32", 4), "lr": ("float32", 4)})
    _expect_inputs(infer, "infer", {"input": ("int8", int(np.prod(shape)))})
    layout = Layout(num_classes, shape[1:], max(train_plan.arena_bytes, infer_plan.arena_bytes), [storage.params[n] for n in trainable_names],
                    storage, float(lr), train_plan.peak_sram_bytes, max(k.stack_bytes for k in lib.kernels.values()))
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
        "kernels": [{"symbol": k.symbol, "prim_func": k.prim_func, "op": k.op, "node": k.node, "stack_bytes": k.stack_bytes} for k in lib.kernels.values()],
    }
