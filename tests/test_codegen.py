"""The generated C training step (tvm_tinytrain.codegen) == Int8Trainer bit for bit, on host gcc, under sanitizers, and for Cortex-M."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tvm
from conftest import make_random_model, paper_model_path
from test_training import partial_scheme
from tvm import te

from relax_passes import memory_plan, pass_config
from relax_passes._row_pipeline import row_pipelines
from relax_passes.plan_memory import plan
from relax_passes.recompute_streamed_expansion import candidates
from tvm_tinytrain.codegen import generate, kernels
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.trainer import Int8Trainer, build_training_module

HARNESS = Path(__file__).with_name("codegen_harness.c")
SOURCES = ("tinytrain_model.c", "tinytrain_kernels.c")
HOST_FLAGS = ["-O2", "-std=c99", "-ffp-contract=off", "-Wall", "-Werror"]
SANITIZE_FLAGS = ["-O0", "-g", "-std=c99", "-ffp-contract=off", "-Wall", "-Werror",
                  "-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"]
ARM_FLAGS = ["-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16", "-c", "-O2", "-ffp-contract=off", "-Wall", "-Werror", "-std=c99"]
CLASSES, STEPS, LR = 4, 3, 0.5  # lr 0.5 with QAS moves almost every trained weight (see test_training.py)


@dataclass
class Case:
    """A generated C model and what the host trainer did on the same data."""

    out: Path
    meta: dict
    trainer: Int8Trainer
    images: np.ndarray
    labels: np.ndarray
    losses: list[float]
    params: list[dict[str, np.ndarray]]  # trained parameters after each step
    logits: np.ndarray  # predict() of every image after the last step
    c_lr: float | None  # lr the harness sets with tinytrain_set_lr (None: generate's default)
    local_bytes: int = 1024  # the plan's kernel_local_bytes


def infer_plan(mod):
    """``infer``'s plan as the code generator makes it: with train_step's kernel workspaces."""
    with pass_config(kernel_local_bytes=memory_plan(mod).kernel_local_bytes):
        return plan(mod, "infer")


@pytest.fixture(scope="module")
def model():
    return make_random_model(3)


# bias-only:2 fuses a frozen expansion into its depthwise conv; bias-only:6 runs depthwise kernels in place;
# "/optimized": the optimized kernel schedules (tvm_tinytrain/ops/schedule.py), same bits, and every kernel buffer of
# more than 16 bytes in the kernel's arena workspace (option kernel_local_bytes; at 16x16 none exceeds the default 1 KB).
@pytest.fixture(scope="module", params=["full", "bias-only:2", "bias-only:6", "partial", "bias-only:2/optimized", "partial/optimized"])
def case(request, model, tmp_path_factory) -> Case:
    tmp = tmp_path_factory.mktemp(request.param.replace(":", "_").replace("/", "_"))
    name, _, kernels = request.param.partition("/")
    spec = partial_scheme(tmp) if name == "partial" else name
    local_bytes = 16 if kernels else 1024
    with pass_config(kernel_local_bytes=local_bytes):
        trainer = Int8Trainer(model, spec, num_classes=CLASSES, lr=LR, kernels=kernels or "reference")
    c_lr = LR if request.param == "full" else None  # one case checks tinytrain_set_lr over a different default
    meta = generate(trainer.mod, tmp / "gen", lr=0.003 if c_lr else LR)
    rng = np.random.default_rng(11)
    images = rng.integers(-128, 128, (STEPS, 3, 16, 16)).astype(np.int8)
    labels = rng.integers(0, CLASSES, STEPS).astype(np.int32)
    losses, params = [], []
    for image, label in zip(images, labels):
        losses.append(trainer.step(image, int(label)))
        params.append({n: trainer.params[n].copy() for n in trainer.updated})
    logits = np.stack([trainer.predict(image) for image in images])
    return Case(tmp / "gen", meta, trainer, images, labels, losses, params, logits, c_lr, local_bytes)


def build(case: Case, compiler: str, flags: list[str], name: str) -> Path:
    exe = case.out / name
    cmd = [compiler, *flags, "-I", str(case.out), *(str(case.out / s) for s in SOURCES), str(HARNESS), "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def run(case: Case, exe: Path) -> tuple[list[float], list[dict[str, bytes]], np.ndarray]:
    """Run the harness on the case's data; parse its losses, parameters after each step, and final logits."""
    data = struct.pack("<i", len(case.images)) + b"".join(img.tobytes() + struct.pack("<i", int(lab)) for img, lab in zip(case.images, case.labels))
    (case.out / "in.bin").write_bytes(data)
    lr = [float(np.float32(case.c_lr)).hex()] if case.c_lr else []
    proc = subprocess.run([str(exe), str(case.out / "in.bin"), str(case.out / "out.bin"), *lr], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{exe.name} exited {proc.returncode}: {proc.stderr[-3000:]}"
    assert "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, proc.stderr[-3000:]
    blob, pos = (case.out / "out.bin").read_bytes(), 0
    losses, params = [], []
    for _ in case.images:
        losses.append(struct.unpack_from("<f", blob, pos)[0])
        pos += 4
        step = {}
        for _ in case.meta["trainable"]:
            end = blob.index(b"\0", pos)
            name = blob[pos:end].decode()
            (size,) = struct.unpack_from("<I", blob, end + 1)
            step[name] = blob[end + 5:end + 5 + size]
            pos = end + 5 + size
        params.append(step)
    logits = np.frombuffer(blob[pos:], np.float32).reshape(len(case.images), case.meta["num_classes"])
    return losses, params, logits


def assert_matches_trainer(case: Case, exe: Path) -> None:
    losses, params, logits = run(case, exe)
    for step, (c_loss, want_loss, c_params, want_params) in enumerate(zip(losses, case.losses, params, case.params)):
        assert np.float32(c_loss).tobytes() == np.float32(want_loss).tobytes(), f"step {step}: loss {c_loss!r} != {want_loss!r}"
        assert list(c_params) == case.trainer.updated, "tinytrain_params must list the trained parameters in updated_params order"
        for name, raw in c_params.items():
            assert raw == np.ascontiguousarray(want_params[name]).tobytes(), f"step {step}: parameter {name} differs"
    assert logits.tobytes() == case.logits.astype(np.float32).tobytes(), "infer after training must equal predict bit for bit"


def assert_pass_keeps_the_bits(trainer, plain, tmp_path: Path, image_shape: tuple[int, ...]) -> list[str]:
    """Three steps of ``trainer`` (a module with some pass) give the losses and trained parameters of ``plain`` (the
    module without it) bit for bit, and so does its generated C under ASan; returns the parameters the steps moved."""
    meta = generate(trainer.mod, tmp_path / "gen", lr=LR)
    rng = np.random.default_rng(3)
    images = rng.integers(-128, 128, (3, *image_shape)).astype(np.int8)
    labels = rng.integers(0, CLASSES, 3).astype(np.int32)
    losses, params = [], []
    for image, label in zip(images, labels):
        loss_value = trainer.step(image, int(label))
        assert np.float32(loss_value).tobytes() == np.float32(plain.step(image, int(label))).tobytes()
        losses.append(loss_value)
        params.append({n: trainer.params[n].copy() for n in trainer.updated})
        for n in trainer.updated:
            assert trainer.params[n].tobytes() == plain.params[n].tobytes(), n
    logits = np.stack([trainer.predict(image) for image in images])
    case = Case(tmp_path / "gen", meta, trainer, images, labels, losses, params, logits, None)
    assert_matches_trainer(case, build(case, "gcc", SANITIZE_FLAGS, "harness_asan"))
    return [n for n in trainer.updated if not np.array_equal(params[-1][n], trainer.mod.attrs["tinytrain.param_init"][n].numpy())]


def test_host_build_matches_trainer_bit_for_bit(case):
    moved = [n for n in case.trainer.updated if not np.array_equal(case.params[-1][n], case.trainer.mod.attrs["tinytrain.param_init"][n].numpy())]
    assert len(moved) >= len(case.trainer.updated) - 1, "a run that moves almost nothing cannot show bit-exactness"
    assert_matches_trainer(case, build(case, "gcc", HOST_FLAGS, "harness"))


def test_sanitized_build_matches_trainer(case):
    assert_matches_trainer(case, build(case, "gcc", SANITIZE_FLAGS, "harness_asan"))


def test_sources_are_standalone_and_build_for_cortex_m7(case):
    for name in (*SOURCES, "tinytrain_model.h"):
        text = re.sub(r"/\*.*?\*/|//[^\n]*", "", (case.out / name).read_text(), flags=re.S)  # code only: comments credit TVM
        assert "malloc" not in text and "free(" not in text, name
        assert not re.search(r"\bTVM\w*|__tvm|tvm/|#include \"(?!tinytrain_model\.h)", text), f"{name} still refers to TVM's runtime"
    if shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("arm-none-eabi-gcc not installed")
    for src in SOURCES:
        subprocess.run(["arm-none-eabi-gcc", *ARM_FLAGS, str(case.out / src), "-o", str(case.out / f"{src}.arm.o")], check=True, capture_output=True, text=True)


def test_header_and_meta_follow_the_plan(case):
    mod = case.trainer.mod
    train, infer = memory_plan(mod), infer_plan(mod)
    text = (case.out / "tinytrain_model.h").read_text()
    defines = {k: int(v) for k, v in re.findall(r"#define (TINYTRAIN_\w+) (\d+)", text)}
    assert defines["TINYTRAIN_ARENA_BYTES"] == max(train.arena_bytes, infer.arena_bytes) == case.meta["arena_bytes"]
    assert defines["TINYTRAIN_TRAINABLE_BYTES"] == train.trainable_param_bytes == case.meta["trainable_bytes"]
    assert defines["TINYTRAIN_NUM_TRAINABLE"] == len(case.trainer.updated) and defines["TINYTRAIN_NUM_CLASSES"] == CLASSES
    assert (defines["TINYTRAIN_INPUT_C"], defines["TINYTRAIN_INPUT_H"], defines["TINYTRAIN_INPUT_W"], defines["TINYTRAIN_INPUT_BYTES"]) == (3, 16, 16, 768)
    meta = json.loads((case.out / "tinytrain_meta.json").read_text())
    assert meta == case.meta and meta["peak_sram_bytes"] == train.peak_sram_bytes
    largest = int(re.search(r"largest kernel workspace .*? (\d+)\n", text).group(1))
    assert largest == max(k["workspace_bytes"] for k in meta["kernels"]) and (largest > 0) == (case.local_bytes < 1024)
    local = int(re.search(r"largest kernel locals .*? (\d+)\n", text).group(1))
    assert local == max(k["local_bytes"] for k in meta["kernels"]) and train.kernel_local_bytes == case.local_bytes
    assert [p["name"] for p in meta["trainable"]] == case.trainer.updated


def test_float_constants_are_printed_exactly(case):
    """TVM prints floats with 7 digits: the softmax's running maximum starts at -FLT_MAX, -3.40282347e+38f, which
    would come out as -3.402823e+38f, a different float32."""
    text = (case.out / "tinytrain_kernels.c").read_text()
    assert "-3.40282347e+38f" in text and "3.402823e+38f" not in text


@pytest.mark.parametrize("size, kernels, window, recompute", [(40, "reference", 1 << 20, "never"), (34, "optimized", 1 << 20, "never"),
                                                              (40, "optimized", 100, "never"), (34, "reference", 100, "never"),
                                                              (34, "optimized", 100, "always"), (40, "reference", 1 << 20, "always")])
def test_streamed_layers_match_trainer(tmp_path, size, kernels, window, recompute):
    """The streamed layers' C loop (the 16x16 cases above stream the first conv alone: longer chains cost more
    there), also at a size whose rows do not divide evenly (34 -> 17 -> 9): rings, zero-point rows past the edges,
    the residual add and the 5x5 depthwise window give the trainer's bits, under ASan, in train_step and in infer
    (through the logits); with a ``window`` of that many bytes (option ``row_window_bytes``), the depthwise convs'
    windows are gathered and their kernels called a few channels at a time; with ``recompute`` "always"
    (RecomputeStreamedExpansion), every expansion feeding a depthwise window is made per channel group from its
    narrow input's rows, which then fill a smaller pipeline."""
    model = make_random_model(4, size=size)
    with pass_config(row_window_bytes=window, recompute_streamed_expansion=recompute):
        trainer = Int8Trainer(model, "bias-only:1", num_classes=CLASSES, lr=LR, kernels=kernels)
    meta = generate(trainer.mod, tmp_path / "gen", lr=LR)
    (train_pipe,) = row_pipelines(trainer.mod, trainer.mod["train_step"])
    (infer_pipe,) = row_pipelines(trainer.mod, trainer.mod["infer"])
    assert len(train_pipe.stages) >= 5 and len(infer_pipe.stages) >= len(train_pipe.stages)
    grouped = [s for s in train_pipe.stages if s.grouped and not s.recomputed]
    assert bool(grouped) == (window < 1 << 20) and all(s.group == 1 or s.window_bytes() <= window for s in grouped)
    for pipe in (train_pipe, infer_pipe):
        recomputed = [s for s in pipe.stages if s.recomputed]
        assert bool(recomputed) == (recompute == "always") and bool(candidates(pipe)) == (recompute == "never")
        if recomputed:
            with pass_config(row_window_bytes=window, recompute_streamed_expansion="never"):
                rings = Int8Trainer(model, "bias-only:1", num_classes=CLASSES, lr=LR, kernels=kernels).mod
            func = "infer" if pipe is infer_pipe else "train_step"
            (ringed,) = row_pipelines(rings, rings[func])
            # in channel groups the expanded rows take less than the rings they replace; all channels at once, not
            assert pipe.expanded_bytes > 0 and (pipe.bytes() < ringed.bytes()) == (window < 1 << 20)
    rng = np.random.default_rng(5)
    images = rng.integers(-128, 128, (2, 3, size, size)).astype(np.int8)
    labels = rng.integers(0, CLASSES, 2).astype(np.int32)
    losses, params = [], []
    for image, label in zip(images, labels):
        losses.append(trainer.step(image, int(label)))
        params.append({n: trainer.params[n].copy() for n in trainer.updated})
    logits = np.stack([trainer.predict(image) for image in images])
    case = Case(tmp_path / "gen", meta, trainer, images, labels, losses, params, logits, None)
    assert_matches_trainer(case, build(case, "gcc", SANITIZE_FLAGS, "harness_asan"))


def test_oversized_kernel_workspace_is_an_error_naming_the_kernel():
    n = kernels.MAX_WORKSPACE_BYTES // 4 + 256  # a float intermediate just over the limit that nothing compacts
    a = te.placeholder((n,), "float32", name="a")
    b = te.compute((n,), lambda i: a[i] * 2.0, name="b")
    c = te.compute((n,), lambda i: b[n - 1 - i] + 1.0, name="c")
    func = kernels.pointer_form(te.create_prim_func([a, c]))
    with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
        lowered = kernels.lower(tvm.IRModule({tvm.ir.GlobalVar("tinytrain_k_0"): func}), tvm.target.Target("c"))
    _, size = kernels.place_workspace(lowered["tinytrain_k_0"], "tinytrain_k_0", 1024)
    assert size == 4 * n
    with pytest.raises(TinyTrainError, match=f"kernel tinytrain_k_0 .*{4 * n} bytes"):
        kernels.check_workspace(size, "tinytrain_k_0")


# A kernel's internal buffer as a C stack array (the form TVM prints for an allocation): its type and length.
STACK_ARRAY = re.compile(r"^\s+(\w+) \w+\[(\d+)\]( = \{0\})?;$", re.M)
C_BYTES = {"int8_t": 1, "uint8_t": 1, "int32_t": 4, "float": 4, "int64_t": 8}
# A kernel call in tinytrain_model.c: binding comment, kernel symbol, arguments.
KERNEL_CALL = re.compile(r"/\* \d+: \w+ \S* -> (\S+) \*/\s+TT_PROFILED\(\d+, (tinytrain_k_\d+)\((.*?)\)\);", re.S)


def test_kernel_buffers_are_slices_of_their_planned_arena_slots(case):
    """No kernel keeps an internal buffer larger than a few registers on the stack: each kernel with larger internal
    buffers takes a trailing workspace pointer, and every call of it (streamed layers' band kernels included) passes
    the slot the memory plan reserved for that call's ``{var}.workspace``, which covers the buffers with their
    alignment."""
    kernels_c = (case.out / "tinytrain_kernels.c").read_text()
    assert all(C_BYTES[ctype] * int(n) <= case.local_bytes for ctype, n, _ in STACK_ARRAY.findall(kernels_c))
    by_symbol = {k["symbol"]: k for k in case.meta["kernels"]}
    assert any(k["workspace_bytes"] for k in by_symbol.values()) == (case.local_bytes < 1024)
    for sym, k in by_symbol.items():
        (proto,) = re.findall(rf"^void {sym}\((.*)\);$", kernels_c, re.M)
        assert proto.endswith(", int8_t* restrict workspace") == bool(k["workspace_bytes"]), proto
    model_c = (case.out / "tinytrain_model.c").read_text()
    train_c, infer_c = model_c.split("int tinytrain_infer_rows(")
    mod = case.trainer.mod
    for text, planned in ((train_c, memory_plan(mod)), (infer_c, infer_plan(mod))):
        slots = sorted((b["name"].removesuffix(".workspace"), b["offset"], b["size"]) for b in planned.buffers if b["name"].endswith(".workspace"))
        passed = []
        for var, sym, args in KERNEL_CALL.findall(text):
            if by_symbol[sym]["workspace_bytes"]:
                offset = int(re.fullmatch(r"\(int8_t \*\)\(tinytrain_arena \+ (\d+)\)", args.split(",")[-1].strip()).group(1))
                passed.append((var, offset, by_symbol[sym]["workspace_bytes"]))
        assert [(v, o) for v, o, _ in sorted(passed)] == [(v, o) for v, o, _ in slots]
        assert all(used <= size and offset % 8 == 0 for (_, offset, used), (_, _, size) in zip(sorted(passed), slots))
    assert case.meta["kernels"] and "workspace_bytes" in case.meta["kernels"][0] and "stack_bytes" not in case.meta["kernels"][0]


@pytest.mark.parametrize("case", ["partial/optimized"], indirect=True)
@pytest.mark.parametrize("change", ["smaller", "absent"])
def test_planned_workspace_smaller_than_the_kernel_buffers_is_an_error_naming_the_kernel(case, change, monkeypatch, tmp_path):
    """A plan whose ``{var}.workspace`` slot is smaller than (or missing for) the buffers the lowered kernel places
    there must not produce C that writes past it."""
    from tvm_tinytrain.codegen import step

    planned = step.memory_plan

    def changed(mod, func_name="train_step"):
        result = planned(mod, func_name)
        k, row = next((k, b) for k, b in enumerate(result.buffers) if b["name"].endswith(".workspace") and b["size"] > 8)
        if change == "smaller":
            row["size"] -= 8
        else:
            del result.buffers[k]
        return result

    monkeypatch.setattr(step, "memory_plan", changed)
    row = next(b for b in memory_plan(case.trainer.mod).buffers if b["name"].endswith(".workspace") and b["size"] > 8)
    var = re.escape(row["name"].removesuffix(".workspace"))
    reserved = row["size"] - 8 if change == "smaller" else 0
    with pytest.raises(TinyTrainError, match=rf"train_step: kernel tinytrain_k_\d+ \(\w+\) for {var} keeps {row['size']} bytes of internal "
                                             rf"buffers, but the memory plan reserved {reserved} for {var}\.workspace"):
        generate(case.trainer.mod, tmp_path / "gen")


def test_mcunet_paper_99kb_first_step_optimized_kernels_match_reference(tmp_path):
    from tvm_tinytrain.importers.paper_pkl import load_paper_model

    model = load_paper_model(paper_model_path("mcunet-5fps"))
    trainer = Int8Trainer(model, "paper-99kb", num_classes=10, lr=0.003)
    optimized = build_training_module(model, "paper-99kb", num_classes=10, kernels="optimized")  # its wide-shift requantization
    meta = generate(optimized, tmp_path / "gen")
    train = memory_plan(optimized)
    text = (tmp_path / "gen" / "tinytrain_model.h").read_text()
    assert f"#define TINYTRAIN_ARENA_BYTES {train.arena_bytes}\n" in text
    assert f"#define TINYTRAIN_TRAINABLE_BYTES {train.trainable_param_bytes}\n" in text
    assert meta["peak_sram_bytes"] == train.peak_sram_bytes
    images = np.random.default_rng(0).integers(-128, 128, (1, 3, 128, 128)).astype(np.int8)
    loss = trainer.step(images[0], 3)
    case = Case(tmp_path / "gen", meta, trainer, images, np.array([3], np.int32), [loss], [{n: trainer.params[n] for n in trainer.updated}],
                np.stack([trainer.predict(images[0])]), None)
    assert_matches_trainer(case, build(case, "gcc", HOST_FLAGS, "harness"))


@pytest.mark.parametrize("scheme, op", [("bias-only:13", "depthwise_block_backward"), ("last-k:6", "depthwise_block_backward_sgd"),
                                        ("default-sparse-c", "depthwise_block_backward_sgd"),
                                        ({"n_bias_update": 6, "weight_idx": [10], "weight_ratio": [1.0]}, "depthwise_block_backward_sgd")])
def test_default_model_fused_depthwise_backward_in_c(tmp_path, scheme, op):
    """The default model runs the TIR-written depthwise block backward (bias-only:13: from the projections' output
    gradients, residual ones through their masks, the biases updated inside; last-k:6: with its expansion's weight
    update in place, a default option; default-sparse-c: on a merged expansion's trained slice; block 4's expansion
    trained whole: its masks recomputed from biases the kernel updates in place) and every in-place kernel; the
    optimized C, sanitized, equals the reference trainer over two steps."""
    from tvm_tinytrain.default_model import load_default_model

    model = load_default_model()
    recomputes = isinstance(scheme, dict)
    if recomputes:
        (tmp_path / "scheme.json").write_text(json.dumps(scheme))
        scheme = str(tmp_path / "scheme.json")
    elif scheme.startswith("default-sparse"):
        scheme = str(Path(__file__).resolve().parents[1] / "scripts" / "schemes" / f"{scheme}.json")
    trainer = Int8Trainer(model, scheme, num_classes=5, lr=0.05)
    optimized = build_training_module(model, scheme, num_classes=5, kernels="optimized")
    meta = generate(optimized, tmp_path / "gen", lr=0.05)
    assert f"{op} " in (tmp_path / "gen" / "tinytrain_kernels.c").read_text()
    fused = [f for f in optimized.functions.values() if str(f.attrs.get("tinytrain.op", "")) == op]
    assert any("m1" in [p.name for p in f.params] for f in fused) == recomputes  # the forward's multipliers: masks recomputed
    images = np.random.default_rng(1).integers(-128, 128, (2, 3, 32, 32)).astype(np.int8)
    labels = np.array([3, 1], np.int32)
    losses, params = [], []
    for image, label in zip(images, labels):
        losses.append(trainer.step(image, int(label)))
        params.append({n: trainer.params[n].copy() for n in trainer.updated})
    case = Case(tmp_path / "gen", meta, trainer, images, labels, losses, params, np.stack([trainer.predict(i) for i in images]), None)
    assert_matches_trainer(case, build(case, "gcc", SANITIZE_FLAGS, "harness_asan"))
