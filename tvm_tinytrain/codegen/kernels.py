"""Every kernel a training step calls, as ONE standalone C source (``tinytrain_kernels.c``).

Each PrimFunc called by ``train_step`` / ``infer`` is rewritten into raw-pointer
form (one ``T.handle`` per buffer parameter, the buffer re-declared in the body
with ``T.decl_buffer(shape, dtype, data=ptr)``) with ``calling_conv`` 0 and no
``global_symbol``: TVM's C host codegen then prints a plain
``void tinytrain_k_<i>(int8_t* arg0_ptr, ...)`` instead of a packed-API wrapper.
We run TVM's default TIR pipeline ourselves (not ``tvm.tirx.build``) because

* ``LowerTVMBuiltin`` turns any allocation of 1 KB or more into
  ``TVMBackendAllocWorkspace`` (and fails outside a packed function); we skip it
  and place every kernel-internal buffer over 1 KB in the kernel's workspace
  instead (:func:`place_workspace`): one trailing ``int8_t* workspace``
  parameter, the arena slot the memory planner reserved for that call
  (``{var}.workspace``, sized by the same function, bounded by
  :data:`MAX_WORKSPACE_BYTES`), so the C needs no allocator and those buffers
  are counted once, in the arena; the smaller ones stay C locals (registers,
  stack), which the planner leaves out of the arena;
* the printer writes float constants with 7 significant digits (``%.6e``), which
  does not round-trip float32 (``-FLT_MAX`` prints as ``-3.402823e+38f``);
  we need the lowered TIR to know each constant's exact value and print every
  float constant again with 9 significant digits (which round-trip float32).

What remains of TVM's runtime in the printed source (its headers, the FFI
library context, ``TVM_DLL``, ``extern "C"`` guards, repeated libm prototypes)
is removed, the one pointer-cast bit reinterpretation TVM prints
(``*(float *)(&(bits))``, a strict-aliasing violation) becomes a ``memcpy``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx

from relax_passes._buffers import IN_PLACE_OPS, OVERWRITING_OPS
from relax_passes._ir import decode
from relax_passes.stream_input_rows import ROW_KERNEL, row_kernel
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.model import DTYPE_BYTES
from tvm_tinytrain.ops import dsp

PREFIX = "tinytrain_k_"
# One kernel's internal buffers (e.g. an expanded channel plane, a staged weight tile); more means a schedule left an
# intermediate stage uncompacted, which the arena would silently pay for at every call of the kernel.
MAX_WORKSPACE_BYTES = 8192
# Where each internal buffer starts in the workspace: a multiple of this and of its element size (4 lets the int8
# buffers be read a word at a time, tinytrain_load_i32).  A workspace must then start at a multiple of the largest
# element size; the planner's slots start at multiples of its alignment, 16 by default.
WORKSPACE_ALIGN = 4
WORKSPACE_SLOT_ALIGN = max(WORKSPACE_ALIGN, *DTYPE_BYTES.values())
C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "int32": "int32_t", "int64": "int64_t", "float32": "float"}
# Functions TVM's C codegen may call: the C standard library only (math.h).
LIBM = {"floorf", "ceilf", "logf", "expf", "sqrtf", "fabsf", "roundf", "truncf", "fmaxf", "fminf", "powf", "nearbyintf"}
_PASS_CONFIG = {"tirx.disable_assert": True, "tirx.disable_vectorize": True}  # no runtime checks, no vector types
_PRELUDE = """\
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

/* TVM prints a bit reinterpretation as *(float *)(&(bits)); memcpy is the defined way to say it. */
static inline float tinytrain_i32_as_f32(int32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

""" + dsp.C_SOURCE


@dataclass(frozen=True)
class Kernel:
    """One emitted C function and the PrimFunc it came from."""

    symbol: str  # C name, tinytrain_k_<i>
    prim_func: str  # the PrimFunc's name in the training module
    op: str
    node: str
    dtypes: tuple[str, ...]  # element dtype of each tensor parameter, in order (the workspace pointer, if any, follows)
    workspace_bytes: int  # its internal buffers, alignment included: 0 = no workspace parameter
    local_bytes: int  # its internal buffers of at most the plan's kernel_local_bytes, C locals on the stack
    prototype: str  # the C declaration, as printed in tinytrain_kernels.c


@dataclass
class KernelLibrary:
    source: str  # tinytrain_kernels.c
    kernels: dict[str, Kernel]  # by PrimFunc name


def called_prim_funcs(mod: tvm.IRModule, func_names) -> list[relax.GlobalVar]:
    """The PrimFuncs the given Relax functions call, in first-call order (so kernel numbers follow the step)."""
    seen: dict[str, relax.GlobalVar] = {}
    for name in func_names:
        for binding in mod[name].body.blocks[0].bindings:
            call = decode(mod, binding)
            if call is not None:
                seen.setdefault(call.gvar.name_hint, call.gvar)
    return list(seen.values())


def pointer_form(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with one raw pointer per buffer parameter, the buffers declared on those pointers.

    The buffer Vars themselves are reused as the declared buffers, so the body is untouched.
    Update kernels run in place (output pointer == parameter pointer), and the planner may let the output of
    an overwriting kernel share a dying operand's storage, so these lose ``tirx.noalias``.
    """
    ptrs, decls = [], []
    for param in func.params:
        ptr = tirx.Var(f"{param.name}_ptr", tvm.ir.PointerType(tvm.ir.PrimType(param.dtype)))
        ptrs.append(ptr)
        decls.append(tirx.stmt.DeclBuffer(param, data=ptr))
    attrs = {k: v for k, v in func.attrs.items() if not k.startswith("tinytrain.") and k != "global_symbol"}
    attrs["calling_conv"] = 0  # kDefault: a plain C function, not the packed API
    if str(func.attrs.get("tinytrain.op", "")) in (*IN_PLACE_OPS, *OVERWRITING_OPS) or "tinytrain.in_place" in func.attrs:
        attrs.pop("tirx.noalias", None)
    return tirx.PrimFunc(ptrs, tirx.SeqStmt([*decls, func.body]), attrs=tvm.ir.make_node("ir.DictAttrs", **attrs))


def lower(ptr_mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """TVM's default TIR pipeline plus ``LowerIntrin`` (libm names), without ``LowerTVMBuiltin`` (see the module doc)."""
    mod = tirx.transform.BindTarget(target.with_host(target))(ptr_mod)
    pipeline, _, _ = tvm.tirx.get_tir_pipeline("default")
    mod = dsp.UseMultiplyAccumulate()(tirx.transform.LowerIntrin()(pipeline(mod)))
    # AnnotateEntryFunc marks a lone function as the packed entry point, which the C host codegen rejects.
    return tvm.IRModule({gv: f.with_attr("tirx.is_entry_func", False) for gv, f in mod.functions.items()})


def _walk(func, node_type) -> list:
    found = []
    tvm_ffi.structural_walk(func.body, [(node_type, found.append)])
    return found


def place_workspace(func: tirx.PrimFunc, kernel: str, local_bytes: int) -> tuple[tirx.PrimFunc, int]:
    """A lowered kernel with its internal buffers placed in a trailing ``int8_t* workspace`` parameter, and the
    bytes they take there (alignment included); ``func`` as it is and 0 when it has none.

    The planner sizes each kernel's ``{var}.workspace`` slot with this function (:func:`workspace_bytes`), the C
    code generator places the buffers with it, so the two agree by construction.  Nothing relies on the bytes a
    buffer starts with: each kernel writes its buffers before reading them (a reduction's init runs at its first
    iteration), as the llvm-built trainer, whose allocations start with whatever memory held, does too.

    Buffers of at most ``local_bytes`` (option ``kernel_local_bytes``, 1 KB: a GEMM tile's accumulators, a staged pair of pixels, a float tile)
    stay C locals: gcc keeps the smallest in registers and reaches the others from the stack pointer, which it
    cannot do for memory the caller can see.  Measured on QEMU M7 (``scripts/device_table.py``): every buffer in
    the workspace cost the optimized MCUNet ``paper-99kb`` step 116.2 M instructions instead of 113.0 M (and 40 %
    more before the workspace was ``restrict``); with the 1 KB ones local, the step is as fast as with all on the
    stack, and the measured SRAM is lowest, as the larger buffers (expanded planes, staged weights, 1-3 KB) share
    the arena with buffers that are dead while their kernel runs, and the stack holds at most 1 KB more.
    Returns the kernel and its workspace bytes; :func:`stack_local_bytes` gives the locals'.
    """
    workspace = tirx.Var("workspace", tvm.ir.PointerType(tvm.ir.PrimType("int8")))
    end = 0

    def place(alloc):
        nonlocal end
        buf = alloc.buffer
        dtype = str(buf.dtype)
        if dtype not in DTYPE_BYTES or not all(isinstance(d, tirx.IntImm) for d in buf.shape):
            raise TinyTrainError(f"codegen: kernel {kernel} allocates {buf.name} with {dtype} {list(buf.shape)}, not a static buffer")
        size = int(np.prod([int(d) for d in buf.shape])) * DTYPE_BYTES[dtype]
        if size <= local_bytes:
            return alloc
        align = max(WORKSPACE_ALIGN, DTYPE_BYTES[dtype])
        offset = (end + align - 1) // align * align
        end = offset + size
        return tirx.stmt.DeclBuffer(buf, data=tirx.ptr_byte_offset(workspace, offset, dtype))

    body = tvm_ffi.structural_map(func.body, [(tirx.stmt.AllocBuffer, place)])
    if not end:
        return func, 0
    return tirx.PrimFunc([*func.params, workspace], body, ret_type=func.ret_type, attrs=func.attrs), end


def workspace_bytes(prim_func: tirx.PrimFunc, kernel: str, local_bytes: int) -> int:
    """Bytes of the workspace the C form of a kernel of the training module takes: what the planner reserves.

    Lowering is most of a plan's time and the passes plan the same kernels again and again (a search plans many
    schemes, RecomputeStreamedExpansion each trial): so sizes are kept per structurally equal PrimFunc."""
    key = tvm_ffi.structural_hash(prim_func)
    for seen, limit, size in _WORKSPACES.get(key, ()):
        if limit == local_bytes and tvm_ffi.structural_equal(seen, prim_func):
            return size
    with tvm.transform.PassContext(config=_PASS_CONFIG):
        lowered = lower(tvm.IRModule({tvm.ir.GlobalVar(f"{PREFIX}0"): pointer_form(c_kernel(prim_func))}), tvm.target.Target("c"))
    size = place_workspace(lowered[f"{PREFIX}0"], kernel, local_bytes)[1]
    _WORKSPACES.setdefault(key, []).append((prim_func, local_bytes, size))
    return size


_WORKSPACES: dict[int, list[tuple[tirx.PrimFunc, int, int]]] = {}


def stack_local_bytes(func: tirx.PrimFunc) -> int:
    """Bytes of the C local arrays of a kernel :func:`place_workspace` placed (on the caller's stack)."""
    return sum(int(np.prod([int(d) for d in a.buffer.shape])) * DTYPE_BYTES[str(a.buffer.dtype)] for a in _walk(func, tirx.stmt.AllocBuffer))


def check_workspace(size: int, kernel: str) -> None:
    if size > MAX_WORKSPACE_BYTES:
        raise TinyTrainError(f"codegen: kernel {kernel} keeps {size} bytes of internal buffers, over the {MAX_WORKSPACE_BYTES}-byte "
                             f"workspace limit (its intermediate stages were not compacted)")


def float_constants(func: tirx.PrimFunc, kernel: str) -> dict[str, float]:
    """The exact float32 value behind each ``%.6e`` text TVM prints for this kernel's constants."""
    exact: dict[str, float] = {}
    for imm in _walk(func, tirx.FloatImm):
        if str(imm.ty) != "float32":
            raise TinyTrainError(f"codegen: kernel {kernel} has a {imm.ty} constant {float(imm.value)!r}; only float32 is supported")
        value = float(np.float32(float(imm.value)))
        text = f"{float(imm.value):.6e}"
        if exact.setdefault(text, value) != value:
            raise TinyTrainError(f"codegen: kernel {kernel} has two float constants that both print as {text}")
    return exact


def c_float(value: float, what: str) -> str:
    """An exact C literal of a float32 value: 9 significant digits always round-trip a float32."""
    text = f"{value:.9g}"
    if not np.isfinite(value) or float(np.float32(float(text))) != float(np.float32(value)):
        raise TinyTrainError(f"codegen: {what}: cannot write {value!r} as an exact float32 C constant")
    return text + ("f" if any(c in text for c in ".e") else ".0f")


# A float literal as TVM prints it; a '-' glued to the digits is its sign (binary minus is printed " - ").
_FLOAT_TEXT = re.compile(r"(?<![\w.)\]])(-?\d\.\d{6}e[+-]\d{2,3})f\b")
_BITCAST = re.compile(r"\(\*\((\w+) \*\)\(&\((\w+)\)\)\)")
# A kernel-local array (at most the plan's kernel_local_bytes).  Its init runs under ``if (k == 0)`` inside the reduction loop,
# which gcc cannot prove runs first (-Wmaybe-uninitialized under -Wall -Werror), so it is zero-initialized too.
_LOCAL_ARRAY = re.compile(r"^(\s+\w+ \w+\[\d+\]);$", re.M)
_EXTERN_C = '#ifdef __cplusplus\nextern "C"\n#endif\n'
_DECL = re.compile(r"^(\w[\w ]*?\**) ?(\w+)\(([^)]*)\);$", re.M)
# TVM's runtime prelude, replaced by _PRELUDE.
_RUNTIME_LINES = re.compile(r'^(// tvm target: .*|#define TVM_EXPORTS|#include "tvm/.*"|#include <(math|stdbool)\.h>'
                            r'|void\* __tvm_ffi__library_ctx = NULL;)$', re.M)


def _exact_literals(body: str, exact: dict[str, float], kernel: str) -> str:
    def fix(match):
        text = match.group(1)
        if text not in exact:
            raise TinyTrainError(f"codegen: kernel {kernel} prints a float {text} that is not one of its constants")
        return c_float(exact[text], f"kernel {kernel}")

    return _FLOAT_TEXT.sub(fix, body)


def _bitcasts(body: str, kernel: str) -> str:
    def fix(match):
        if match.group(1) != "float":
            raise TinyTrainError(f"codegen: kernel {kernel} reinterprets bits as {match.group(1)}; only int32 -> float is supported")
        return f"tinytrain_i32_as_f32({match.group(2)})"

    return _BITCAST.sub(fix, body)


def _restrict_workspace(text: str, kernel: str) -> str:
    """The workspace parameter declared ``restrict``: its slot overlaps no other buffer the kernel can reach (the
    planner's proof), and only then may gcc keep the internal buffers (accumulators, staged pairs) in registers
    across the loops that write the kernel's outputs, as it did when they were stack arrays.  TVM's C printer marks
    no parameter ``restrict``, and all of a kernel's or none once ``tirx.noalias`` is set (in-place kernels' outputs
    do alias their operands), so the qualifier is added to the printed text."""
    fixed, count = re.subn(r"\bint8_t\* workspace\)", "int8_t* restrict workspace)", text, count=1)
    if count != 1:
        raise TinyTrainError(f"codegen: kernel {kernel}: TVM printed no trailing int8_t* workspace parameter")
    return fixed


def split_functions(source: str) -> tuple[dict[str, str], dict[str, str]]:
    """TVM's printed source as {symbol: definition} and {name: prototype}; anything else but its runtime prelude is an error."""
    source = source.replace(_EXTERN_C, "").replace("TVM_DLL ", "")
    definitions = {name: text for text, name in re.findall(rf"^(void ({PREFIX}\d+)\([^)]*\) \{{\n.*?\n\}}\n)", source, re.M | re.S)}
    declarations = {m.group(2): m.group(0) for m in _DECL.finditer(source)}
    rest = source
    for text in [*definitions.values(), *declarations.values()]:
        rest = rest.replace(text, "")
    rest = _RUNTIME_LINES.sub("", rest).strip()
    if rest:
        raise TinyTrainError(f"codegen: TVM's C source has code outside the kernels that the standalone source would lose: {rest[:300]!r}")
    return definitions, declarations


def _check_externs(declarations: dict[str, str], definitions: dict[str, str]) -> None:
    for name in declarations:
        if name.startswith(PREFIX) or name in LIBM or name in dsp.NAMES:
            continue
        users = [sym for sym, text in definitions.items() if re.search(rf"\b{name}\(", text)]
        raise TinyTrainError(f"codegen: TVM's C for kernel(s) {', '.join(users) or '?'} calls {name}, which is not in the C library")


def c_kernel(prim_func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The PrimFunc the C calls for a kernel: a streamed layer's band kernel (the step function runs it row by row,
    see step.py), else the kernel itself."""
    if ROW_KERNEL in prim_func.attrs:
        return row_kernel(prim_func).with_attrs({k: v for k, v in prim_func.attrs.items() if k != ROW_KERNEL})
    return prim_func


def emit(mod: tvm.IRModule, func_names=("train_step", "infer"), local_bytes: int = 1024) -> KernelLibrary:
    """Lower every kernel of ``func_names`` with target ``c`` and print one standalone C source; internal buffers of
    at most ``local_bytes`` stay C locals (the memory plan's ``kernel_local_bytes``)."""
    gvars = called_prim_funcs(mod, func_names)
    symbols = {gv.name_hint: f"{PREFIX}{i}" for i, gv in enumerate(gvars)}
    funcs = {gv.name_hint: c_kernel(mod[gv]) for gv in gvars}
    ptr_mod = tvm.IRModule({tvm.ir.GlobalVar(symbols[name]): pointer_form(f) for name, f in funcs.items()})
    target = tvm.target.Target("c")
    with tvm.transform.PassContext(config=_PASS_CONFIG):
        lowered = lower(ptr_mod, target)
        placed = {sym: place_workspace(lowered[sym], f"{sym} ({name})", local_bytes) for name, sym in symbols.items()}
        printed = tvm.tirx.transform.SkipAssert()(tvm.IRModule({gv: placed[gv.name_hint][0] for gv in lowered.functions}))
        source = tvm.get_global_func("target.build.c")(printed, target).inspect_source()
    definitions, declarations = split_functions(source)
    _check_externs(declarations, definitions)
    if sorted(definitions) != sorted(symbols.values()):
        raise TinyTrainError(f"codegen: TVM printed functions {sorted(definitions)}, expected {sorted(symbols.values())}")
    kernels, bodies = {}, {}
    for gv in gvars:
        sym, func = symbols[gv.name_hint], funcs[gv.name_hint]
        low, workspace = placed[sym]
        label = f"{sym} ({gv.name_hint})"
        check_workspace(workspace, label)
        text = _LOCAL_ARRAY.sub(r"\1 = {0};", _bitcasts(_exact_literals(definitions[sym], float_constants(low, label), label), label))
        bodies[sym], prototype = (_restrict_workspace(t, label) for t in (text, declarations[sym])) if workspace else (text, declarations[sym])
        attrs = func.attrs
        kernels[gv.name_hint] = Kernel(sym, gv.name_hint, str(attrs.get("tinytrain.op", "")), str(attrs.get("tinytrain.node", "")),
                                       tuple(str(p.dtype) for p in func.params), workspace, stack_local_bytes(low), prototype)
    return KernelLibrary(_render(kernels, bodies), kernels)


def _render(kernels: dict[str, Kernel], bodies: dict[str, str]) -> str:
    table = "\n".join(f" *   {k.symbol:<16} {k.op:<24} {k.node:<24} workspace {k.workspace_bytes:>5} B, locals {k.local_bytes:>4} B"
                      for k in kernels.values())
    head = ("/* tinytrain_kernels.c: the int8 training kernels, printed by Apache TVM's C codegen (target \"c\")\n"
            " * from the TIR of each kernel and made standalone by tvm_tinytrain.codegen.  Generated; do not edit.\n"
            " * Compile with -ffp-contract=off (float operations stay in source order); no allocator, no runtime.\n *\n"
            " * Each kernel's internal buffers of more than 1 KB lie in its workspace, the last argument: the arena slot planned for the\n"
            " * call; the smaller ones are C locals.\n *\n"
            f" *   symbol           op                       node                     internal buffers\n{table}\n */\n")
    protos = "\n".join(k.prototype for k in kernels.values())
    return head + _PRELUDE + "\n" + protos + "\n\n" + "\n".join(bodies[k.symbol] for k in kernels.values())
