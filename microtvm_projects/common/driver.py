"""The board-independent half of every project driver (our replacement for microTVM's Project API).

A board's ``project.py`` describes the board (template folders, compiler flags, default options, how to start the
program) and exposes ``generate_project``, ``build`` and ``run``; this module does the rest: copying the template and
the model into a project folder, ``make``, the flash/RAM report, running under a timeout, and the dataset format.

A generated project folder holds ``Makefile`` + ``options.mk`` (the board's compiler and flags: ``make`` alone
rebuilds it), ``project.json`` (board and options), ``src/`` (template C files), ``model/`` (the model's four files)
and ``build/`` (the program).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

TEMPLATES = Path(__file__).resolve().parents[1]
MODEL_FILES = ("tinytrain_model.h", "tinytrain_model.c", "tinytrain_kernels.c", "tinytrain_meta.json")
META_KEYS = ("model", "input_shape", "num_classes", "trainable", "arena_bytes", "trainable_bytes", "peak_sram_bytes")
RUN_OUTPUTS = ("log.json", "weights.bin")  # what the training program writes into its out_dir
DATASET_MAGIC = b"TTDS"
DATASET_VERSION = 1
DATASET_HEADER = struct.Struct("<4s4I")  # magic, version, count, image_bytes, num_classes

# Hard-float builds of the two cores; host and boards then agree on float32 results bit for bit (-ffp-contract=off).
CORTEX_M_CPU_FLAGS = {
    "cortex-m4": "-mcpu=cortex-m4 -mfpu=fpv4-sp-d16 -mfloat-abi=hard",
    "cortex-m7": "-mcpu=cortex-m7 -mfpu=fpv5-d16 -mfloat-abi=hard",
    "cortex-m7-sp": "-mcpu=cortex-m7 -mfpu=fpv5-sp-d16 -mfloat-abi=hard",  # single-precision FPU (STM32F7x6)
}
REGION_OPTIONS = {"RAM": "ram_bytes", "FLASH": "flash_bytes"}
FLASH_SECTIONS = (".text", ".rodata", ".ARM.exidx", ".data")  # .data's initial values are stored in flash too
OUTPUT_TAIL = 2000


class ProjectError(RuntimeError):
    """A project that cannot be generated, built or run; the message says why."""


class BuildError(ProjectError):
    """make failed; for an image too large for the board, ``region`` and ``overflow_bytes`` say where and by how much."""

    def __init__(self, message: str, region: str | None = None, overflow_bytes: int | None = None):
        super().__init__(message)
        self.region = region
        self.overflow_bytes = overflow_bytes


class RunError(ProjectError):
    """The program failed: non-zero exit (``returncode``), a fault report or a missing output."""

    def __init__(self, message: str, returncode: int | None = None, output: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.output = output


class RunTimeout(RunError):
    """The program did not finish within timeout_s and was killed (a hang, or a timeout too short)."""


@dataclass(frozen=True)
class Board:
    name: str
    template_dirs: tuple[str, ...]  # folders under microtvm_projects/ whose .c/.h/.ld files go to src/
    defaults: dict  # every option the board takes, with its default
    make_vars: Callable[[dict], dict[str, str]]  # options -> CC, TARGET, CFLAGS, LDFLAGS for options.mk
    size_tool: str | None = None  # binutils `size` of the target; None: no board memory report (host)
    generated_sources: Callable[[dict], dict[str, str]] | None = None  # options -> {file name in src/: C text}
    command: Callable[[Path, dict, list[str]], list[str]] | None = None  # (program, options, args) -> argv; None: not run here
    not_run: str = ""  # why `command` is None: how to run it instead


@dataclass(frozen=True)
class BuildInfo:
    executable: Path
    flash_bytes: int | None  # .text + .rodata + .ARM.exidx + .data (initial values)
    data_bytes: int | None
    bss_bytes: int | None
    heap_reserved_bytes: int | None
    stack_reserved_bytes: int | None


def entry_points(board: Board):
    """generate_project(model_dir, project_dir, **options), build(project_dir) and run(project_dir, data_file, steps,
    out_dir, lr=None, eval_count=0, timeout_s=60.0): the API of every board's project.py, bound to its board."""

    def generate_project_(model_dir, project_dir, **options) -> Path:
        return generate_project(board, model_dir, project_dir, options)

    def build_(project_dir) -> BuildInfo:
        return build(board, project_dir)

    def run_(project_dir, data_file, steps: int, out_dir, lr: float | None = None, eval_count: int = 0, timeout_s: float = 60.0) -> dict:
        return run(board, project_dir, data_file, steps, out_dir, lr, eval_count, timeout_s)

    return generate_project_, build_, run_


def cortex_m_make_vars(cpu: str, options: dict, specs: str, flash_origin: int, ram_origin: int) -> dict[str, str]:
    """options.mk of a Cortex-M board: the core's flags, our startup and linker script instead of crt0, newlib-nano."""
    memory = {"__flash_origin": flash_origin, "__flash_size": options["flash_bytes"], "__ram_origin": ram_origin,
              "__ram_size": options["ram_bytes"], "__stack_size": options["stack_bytes"], "__heap_size": options["heap_bytes"]}
    bad = [f"{k}={options[k]!r}" for k in ("flash_bytes", "ram_bytes", "stack_bytes", "heap_bytes")
           if not isinstance(options[k], int) or isinstance(options[k], bool) or options[k] < 0]
    if bad:
        raise ProjectError(f"memory sizes must be whole numbers of bytes: {', '.join(bad)}")
    return {
        "CC": "arm-none-eabi-gcc",
        "TARGET": "tinytrain.elf",
        "CFLAGS": f"{CORTEX_M_CPU_FLAGS[cpu]} -ffunction-sections -fdata-sections {define_flags(options['defines'])}".strip(),
        # -u _printf_float: log.json prints float losses, which newlib-nano's printf leaves out unless asked.
        "LDFLAGS": " ".join(["-T src/cortex_m.ld -nostartfiles --specs=nano.specs", f"--specs={specs}", "-u _printf_float -Wl,--gc-sections",
                             *(f"-Wl,--defsym={k}={v:#x}" for k, v in memory.items())]),
    }


def define_flags(defines: dict) -> str:
    """-D flags; names and values are checked because they end up on a make/shell command line."""
    flags = []
    for name, value in defines.items():
        if not re.fullmatch(r"[A-Za-z_]\w*", name) or (value is not None and not re.fullmatch(r"[\w.+-]+", str(value))):
            raise ProjectError(f"define {name}={value!r}: names must be C identifiers and values plain numbers or words")
        flags.append(f"-D{name}" if value is None else f"-D{name}={value}")
    return " ".join(flags)


def read_meta(model_dir: Path) -> dict:
    path = Path(model_dir) / "tinytrain_meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ProjectError(f"{path}: cannot be read ({str(err)[:120]}); generate the model again") from None
    if not isinstance(meta, dict):
        raise ProjectError(f"{path}: must hold a JSON object; generate the model again")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ProjectError(f"{path}: missing field(s) {', '.join(missing)}")
    return meta


def generate_project(board: Board, model_dir, project_dir, options: dict) -> Path:
    """Copies the board template and the model into project_dir (replacing an earlier project there)."""
    unknown = sorted(set(options) - set(board.defaults))
    if unknown:
        raise ProjectError(f"{board.name}: unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(board.defaults))}")
    options = {**board.defaults, **options}
    model_dir, project_dir = Path(model_dir), Path(project_dir)
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ProjectError(f"{model_dir}: missing model file(s) {', '.join(missing)}")
    meta = read_meta(model_dir)
    if options.get("dataset"):  # a board that compiles its dataset in
        check_dataset(options["dataset"], meta)
    if project_dir.exists() and any(project_dir.iterdir()) and not (project_dir / "project.json").is_file():
        raise ProjectError(f"{project_dir} is not empty and holds no tinytrain project: not overwriting it")
    make_vars = board.make_vars(options)  # checks the options before anything is written
    generated = board.generated_sources(options) if board.generated_sources else {}
    for sub in ("src", "model", "build"):
        shutil.rmtree(project_dir / sub, ignore_errors=True)
    (project_dir / "src").mkdir(parents=True)
    (project_dir / "model").mkdir()
    for folder in board.template_dirs:
        for path in sorted((TEMPLATES / folder).iterdir()):
            if path.suffix in (".c", ".h", ".ld"):
                shutil.copy2(path, project_dir / "src" / path.name)
    for name in MODEL_FILES:
        shutil.copy2(model_dir / name, project_dir / "model" / name)
    for name, text in generated.items():
        (project_dir / "src" / name).write_text(text)
    shutil.copy2(TEMPLATES / "common" / "Makefile", project_dir / "Makefile")
    (project_dir / "options.mk").write_text(f"# {board.name} project, written by generate_project\n" + "".join(f"{k} = {v}\n" for k, v in make_vars.items()))
    (project_dir / "project.json").write_text(json.dumps({"board": board.name, "model": meta["model"], "options": options}, indent=1, default=str) + "\n")
    return project_dir


def project_options(board: Board, project_dir) -> dict:
    path = Path(project_dir) / "project.json"
    if not path.is_file():
        raise ProjectError(f"{project_dir}: no project.json; create the project with generate_project first")
    project = json.loads(path.read_text())
    if project["board"] != board.name:
        raise ProjectError(f"{project_dir} is a {project['board']} project, not {board.name}")
    return project["options"]


def build(board: Board, project_dir) -> BuildInfo:
    """make; an image too large for a memory region raises BuildError naming the region and the overflow."""
    project_dir = Path(project_dir)
    options = project_options(board, project_dir)
    proc = subprocess.run(["make", "-C", str(project_dir), f"-j{os.cpu_count() or 1}"], capture_output=True, text=True)
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        overflows = re.findall(r"region `(\w+)' overflowed by (\d+) bytes", output)
        if overflows:
            parts = [f"region {region} overflowed by {n} bytes ({region} is {options[REGION_OPTIONS[region]]} bytes, option {REGION_OPTIONS[region]})"
                     for region, n in overflows]
            raise BuildError(f"{board.name}: the program does not fit the board: {'; '.join(parts)}", overflows[0][0], int(overflows[0][1]))
        raise BuildError(f"{board.name}: make failed in {project_dir}:\n{output[-OUTPUT_TAIL:]}")
    executable = project_dir / "build" / board.make_vars(options)["TARGET"]
    if board.size_tool is None:
        return BuildInfo(executable, None, None, None, None, None)
    sizes = section_sizes(board.size_tool, executable)
    return BuildInfo(executable, sum(sizes.get(name, 0) for name in FLASH_SECTIONS), sizes.get(".data", 0), sizes.get(".bss", 0),
                     sizes.get(".heap", 0), sizes.get(".stack", 0))


def section_sizes(size_tool: str, executable: Path) -> dict[str, int]:
    """{section: bytes} from `size -A`."""
    out = subprocess.run([size_tool, "-A", str(executable)], capture_output=True, text=True, check=True).stdout
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\.\S+)\s+(\d+)\s+\d+\s*$", out, re.MULTILINE)}


def run_with_timeout(argv: list[str], timeout_s: float, what: str) -> tuple[int, str]:
    """Runs argv in its own process group; past timeout_s the whole group is killed and RunTimeout raised."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except BaseException as error:  # the timeout, or an interrupt of this process: never leave an emulator running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        if not isinstance(error, subprocess.TimeoutExpired):
            raise
        raise RunTimeout(f"{what}: no result after {timeout_s} s, killed (a hang, or timeout_s too short); output:\n{output[-OUTPUT_TAIL:]}",
                         None, output) from None
    return proc.returncode, output


def run(board: Board, project_dir, data_file, steps: int, out_dir, lr: float | None, eval_count: int, timeout_s: float) -> dict:
    """Builds if needed, runs `tinytrain data_file steps out_dir lr eval_count` and returns log.json with the memory report."""
    if board.command is None:
        raise ProjectError(f"{board.name}: not run by this driver: {board.not_run}")
    project_dir = Path(project_dir)
    options = project_options(board, project_dir)
    meta = read_meta(project_dir / "model")
    check_dataset(data_file, meta)
    info = build(board, project_dir)
    out_dir = Path(out_dir).resolve()
    # The program writes into a fresh staging folder, moved into out_dir only once the run has succeeded: a failed
    # run leaves the previous run's outputs as they were, and a successful one never shows a previous run's.
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        args = [str(Path(data_file).resolve()), str(int(steps)), str(staging), "-" if lr is None else repr(float(lr)), str(int(eval_count))]
        returncode, output = run_with_timeout(board.command(info.executable, options, args), timeout_s, f"{board.name} {info.executable}")
        if returncode != 0:
            how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"code {returncode}"
            raise RunError(f"{board.name}: tinytrain exited with {how} (data {data_file}, {steps} steps):\n{output[-OUTPUT_TAIL:]}",
                           returncode, output)
        if not all((staging / name).is_file() for name in RUN_OUTPUTS):
            raise RunError(f"{board.name}: tinytrain exited with 0 but wrote no log.json/weights.bin in {staging}:\n{output[-OUTPUT_TAIL:]}",
                           0, output)
        try:
            log = json.loads((staging / "log.json").read_text())
        except ValueError as err:
            raise RunError(f"{board.name}: log.json is not valid JSON ({err}):\n{output[-OUTPUT_TAIL:]}", 0, output) from None
        if info.stack_reserved_bytes and log["stack_peak_bytes"] >= info.stack_reserved_bytes:
            raise RunError(f"{board.name}: the stack used all of its {info.stack_reserved_bytes} bytes (it may have overflowed): raise option "
                           "stack_bytes", 0, output)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in RUN_OUTPUTS:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summarize(board, meta, info, log, out_dir / "log.json", out_dir / "weights.bin", output)


def summarize(board: Board, meta: dict, info: BuildInfo, log: dict, log_path: Path, weights_path: Path, output: str) -> dict:
    """log.json plus per-step lists, the counter's mean per step and the SRAM parts (arena and trainable are inside .bss)."""
    result = dict(log, board=board.name, model=meta["model"], losses=[s["loss"] for s in log["step_log"]], log=str(log_path),
                  weights=str(weights_path), output=output, flash_bytes=info.flash_bytes)
    counter = log["counter"]
    if counter and log["step_log"]:
        counts = [s[counter] for s in log["step_log"]]
        result[f"{counter}_per_step"] = round(sum(counts) / len(counts))
        if "profile" in log:  # a TINYTRAIN_PROFILE build: the counter per kernel kind
            result[f"{counter}_per_step_by_op"] = {op: round(v / len(counts)) for op, v in log["profile"].items()}
    static = None if info.data_bytes is None else info.data_bytes + info.bss_bytes
    result["sram_bytes"] = {
        "arena": meta["arena_bytes"], "trainable": meta["trainable_bytes"], "data": info.data_bytes, "bss": info.bss_bytes,
        "heap_peak": log["heap_peak_bytes"], "stack_peak": log["stack_peak_bytes"],
        "total": None if static is None else static + log["heap_peak_bytes"] + log["stack_peak_bytes"],
        "reserved": None if static is None else static + info.heap_reserved_bytes + info.stack_reserved_bytes,
    }
    return result


def write_dataset(path, images, labels, num_classes: int | None = None) -> Path:
    """Writes a TTDS file: header (magic, version 1, count, image_bytes, num_classes; little-endian uint32), then per
    record an int32 label and the int8 image in C, H, W order. num_classes defaults to max(label) + 1."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.int8 or images.ndim != 4:
        raise ValueError(f"images must be int8 (N, C, H, W), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
    image_bytes = int(np.prod(images.shape[1:]))
    records = np.empty(len(images), dtype=[("label", "<i4"), ("image", "i1", (image_bytes,))])
    records["label"] = labels
    records["image"] = images.reshape(len(images), image_bytes)
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    path = Path(path)
    path.write_bytes(DATASET_HEADER.pack(DATASET_MAGIC, DATASET_VERSION, len(images), image_bytes, classes) + records.tobytes())
    return path


def check_dataset(path, meta: dict) -> None:
    """Refuses a TTDS file the model in ``meta`` cannot train on, naming the file and the field or record at fault.

    The training program checks the same before its first step; checking here first turns a failed run (whose
    error is the program's output) into one line, and keeps a board build from compiling in a dataset it rejects."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(DATASET_HEADER.size)
    except OSError as err:
        raise ProjectError(f"{path}: cannot read the dataset ({err.strerror})") from None
    if len(head) < DATASET_HEADER.size or head[:4] != DATASET_MAGIC:
        raise ProjectError(f"{path}: not a TTDS dataset (write one with write_dataset)")
    _, version, count, image_bytes, num_classes = DATASET_HEADER.unpack(head)
    if version != DATASET_VERSION:
        raise ProjectError(f"{path}: TTDS version {version}; this driver reads version {DATASET_VERSION}")
    want_bytes, want_classes = int(np.prod(meta["input_shape"])), int(meta["num_classes"])
    if image_bytes != want_bytes:
        raise ProjectError(f"{path}: field image_bytes is {image_bytes}; the model takes {want_bytes}-byte images "
                           f"({'x'.join(map(str, meta['input_shape']))})")
    if num_classes != want_classes:
        raise ProjectError(f"{path}: field num_classes is {num_classes}; the model has {want_classes} classes")
    if count == 0:
        raise ProjectError(f"{path}: field count is 0: the dataset has no records")
    record = 4 + image_bytes
    if size < DATASET_HEADER.size + count * record:
        raise ProjectError(f"{path}: {size} bytes, too short for the {count} records its header announces "
                           f"({DATASET_HEADER.size + count * record} bytes)")
    labels = np.memmap(path, np.dtype([("label", "<i4"), ("image", f"V{image_bytes}")]), "r", DATASET_HEADER.size, (count,))["label"]
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ProjectError(f"{path}: record {bad[0]}: label {labels[bad[0]]} is not in 0..{num_classes - 1}"
                           + (f" ({len(bad)} records in all)" if len(bad) > 1 else ""))


def read_weights(meta: dict, path) -> dict[str, np.ndarray]:
    """weights.bin split into the trainable parameters of tinytrain_meta.json (same order as tinytrain_params)."""
    blob = Path(path).read_bytes()
    expected = sum(param["bytes"] for param in meta["trainable"])
    if len(blob) != expected:
        raise ProjectError(f"{path}: {len(blob)} bytes, but the model's trainable parameters take {expected}")
    weights, offset = {}, 0
    for param in meta["trainable"]:
        dtype = np.dtype(param["dtype"]).newbyteorder("<")
        weights[param["name"]] = np.frombuffer(blob, dtype, int(np.prod(param["shape"])), offset).reshape(param["shape"])
        offset += param["bytes"]
    return weights
