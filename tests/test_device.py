"""The generated C training step on the host build and on emulated Cortex-M4/M7: bit-exact, measured, exportable."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import paper_model_path

from relax_passes import pass_config
from tvm_tinytrain.boards import build_project, run_project, trained_model, write_dataset
from tvm_tinytrain.cli import main
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.importers import load_model
from tvm_tinytrain.importers.onnx_import import load_onnx
from tvm_tinytrain.ops import reference
from tvm_tinytrain.trainer import Int8Trainer

needs_arm = pytest.mark.skipif(not (shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm")), reason="Cortex-M toolchain missing")


def dataset(tmp_path, shape, classes, n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (n, *shape)).astype(np.int8)
    y = rng.integers(0, classes, n)
    return write_dataset(tmp_path / "data.bin", x, y, classes), x, y


@needs_arm
def test_tiny_model_host_m4_m7_and_python_agree(tmp_path, tiny_pkl):
    model = load_model(tiny_pkl)
    data, x, y = dataset(tmp_path, model.input_info.shape, 3)
    weights = {}
    for target in ("host", "qemu-m4", "qemu-m7"):
        build_project(str(tiny_pkl), model, "last-k:3", target, tmp_path / target, num_classes=3, lr=0.05)
        result = run_project(tmp_path / target, data, steps=5, timeout_s=120)
        weights[target] = (tmp_path / target / "run" / "weights.bin").read_bytes()
        assert len(result["losses"]) == 5
        if target != "host":
            assert result["instructions_per_step"] > 0 and result["sram_bytes"]["stack_peak"] > 0
    assert weights["host"] == weights["qemu-m4"] == weights["qemu-m7"]
    trainer = Int8Trainer(model, "last-k:3", num_classes=3, lr=0.05)
    for i in range(5):
        trainer.step(x[i % len(x)], int(y[i % len(y)]))
    want = b"".join(np.ascontiguousarray(trainer.params[n]).tobytes() for n in trainer.updated)
    assert weights["qemu-m7"] == want

    exported = tmp_path / "trained.onnx"
    assert main(["export", str(tmp_path / "qemu-m7"), "--onnx", str(exported)]) == 0
    onnx.checker.check_model(onnx.load(str(exported)), full_check=True)
    back = load_onnx(str(exported))
    trained = trained_model(tmp_path / "qemu-m7")
    np.testing.assert_array_equal(reference.run_model(back, x[:2]), reference.run_model(trained, x[:2]))
    np.testing.assert_array_equal(reference.run_model(trained, x[:1])[0], trainer.predict(x[0]))


@needs_arm
def test_image_too_large_for_the_board_names_region_and_overflow(tmp_path, tiny_pkl):
    model = load_model(tiny_pkl)
    with pytest.raises(TinyTrainError, match=r"region RAM overflowed by \d+ bytes"):
        build_project(str(tiny_pkl), model, "full", "qemu-m7", tmp_path / "b", num_classes=3, board_options={"ram_bytes": 8192})


@needs_arm
def test_hung_run_ends_with_a_clear_error(tmp_path, tiny_pkl):
    model = load_model(tiny_pkl)
    data, _, _ = dataset(tmp_path, model.input_info.shape, 3)
    build_project(str(tiny_pkl), model, "full", "qemu-m7", tmp_path / "b", num_classes=3)
    with pytest.raises(TinyTrainError, match="no result after"):
        run_project(tmp_path / "b", data, steps=10**6, timeout_s=2)


@needs_arm
def test_mcunet_paper_99kb_on_emulated_cortex_m7(tmp_path):
    """MCUNet-5FPS paper-99kb at 128x128: links inside the 320 KB RAM region, 10 steps on QEMU M7 give the host
    build's weights byte for byte, and the Python trainer's (the C step runs its kernels in place over one arena, e.g.
    block 1's projection flush with the end of its operand, which the trainer's separate tensors never do), and the
    measured SRAM is under 256 KB.  Both streamed expansions are recomputed by their depthwise windows (option
    ``recompute_streamed_expansion="always"``; by default MCUNet keeps their rings, which do not set its peak), so the
    board runs that C loop too."""
    path = paper_model_path("mcunet-5fps")
    model = load_model(path)
    data, x, y = dataset(tmp_path, model.input_info.shape, 10, n=4)
    runs = {}
    for target in ("host", "qemu-m7"):
        with pass_config(recompute_streamed_expansion="always"):
            build_project(str(path), model, "paper-99kb", target, tmp_path / target, num_classes=10)
        runs[target] = run_project(tmp_path / target, data, steps=10, timeout_s=300)
        assert "for (int32_t tt_r = TT_MAX(0, " in (tmp_path / target / "model/tinytrain_model.c").read_text()  # the recomputed rows
    assert (tmp_path / "host/run/weights.bin").read_bytes() == (tmp_path / "qemu-m7/run/weights.bin").read_bytes()
    assert runs["host"]["losses"] == runs["qemu-m7"]["losses"]
    trainer = Int8Trainer(model, "paper-99kb", num_classes=10, lr=0.003)
    for i in range(10):
        trainer.step(x[i % len(x)], int(y[i % len(y)]))
    want = b"".join(np.ascontiguousarray(trainer.params[n]).tobytes() for n in trainer.updated)
    assert (tmp_path / "host/run/weights.bin").read_bytes() == want
    sram = runs["qemu-m7"]["sram_bytes"]
    assert sram["total"] < 256 * 1024, sram
    meta = json.loads((tmp_path / "qemu-m7/model/tinytrain_meta.json").read_text())
    assert sram["data"] + sram["bss"] >= meta["arena_bytes"] + meta["trainable_bytes"]


@needs_arm
def test_stm32f746_template_builds_the_default_model(tmp_path):
    """The real-board template: the default model's training step and a small dataset compiled into flash (built, not run)."""
    from tvm_tinytrain.default_model import DEFAULT_MODEL_PATH

    model = load_model(DEFAULT_MODEL_PATH)
    rng = np.random.default_rng(0)
    data = tmp_path / "small.npz"
    np.savez(data, images=rng.integers(-128, 128, (20, *model.input_info.shape)).astype(np.int8), labels=rng.integers(0, 5, 20))
    argv = ["build", str(DEFAULT_MODEL_PATH), "--scheme", "last-k:6", "--num-classes", "5", "--target", "stm32f746",
            "-o", str(tmp_path / "stm32"), "--data", str(data), "--steps", "20", "--json"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "stm32" / "tinytrain_build.json").read_text())
    assert record["target"] == "stm32f746" and 0 < record["build"]["flash_bytes"] <= 1024 * 1024
    assert (tmp_path / "stm32" / "project" / "build").exists()


@needs_arm
def test_profile_build_counts_instructions_per_kernel_kind(tmp_path, tiny_pkl):
    """A TINYTRAIN_PROFILE build reports each kernel kind's instructions; they add up to nearly the whole step
    (the rest: copying the image, label and lr), and the reference kernels take more than the optimized ones."""
    model = load_model(tiny_pkl)
    data, _, _ = dataset(tmp_path, model.input_info.shape, 3)
    totals = {}
    for kernels in ("reference", "optimized"):
        build_project(str(tiny_pkl), model, "full", "qemu-m4", tmp_path / kernels, num_classes=3,
                      board_options={"defines": {"TINYTRAIN_PROFILE": None}}, kernels=kernels)
        result = run_project(tmp_path / kernels, data, steps=2, timeout_s=120)
        by_op = result["instructions_per_step_by_op"]
        assert {"conv2d_requant", "conv2d_input_grad", "softmax_cross_entropy"} <= set(by_op)
        assert 0.9 * result["instructions_per_step"] < sum(by_op.values()) <= result["instructions_per_step"]
        totals[kernels] = result["instructions_per_step"]
    assert totals["optimized"] < totals["reference"]
