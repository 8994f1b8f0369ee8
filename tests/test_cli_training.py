"""``tinytrain memory`` and ``tinytrain train`` on a tiny model, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tvm_tinytrain.cli import main
from tvm_tinytrain.errors import TinyTrainError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "tvm_tinytrain" / "data" / "default_model.onnx"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_memory_json_and_plot(capsys, tiny_pkl, tmp_path):
    plot = tmp_path / "mem.png"
    code, out, _ = run_cli(capsys, "memory", tiny_pkl, "--scheme", "last-k:2", "--json", "--plot", plot)
    assert code == 0
    r = json.loads(out)
    parts = r["parts"]
    assert r["peak_sram_bytes"] == parts["arena_bytes"] + parts["trainable_param_bytes"]
    assert parts["trainable_param_bytes"] > 0 and plot.stat().st_size > 1000
    code, out, _ = run_cli(capsys, "memory", tiny_pkl, "--scheme", "last-k:2", "--no-reorder", "--json")
    assert json.loads(out)["peak_sram_bytes"] >= r["peak_sram_bytes"]


def test_memory_timeline_and_what_is_alive_at_an_op(capsys):
    """``--timeline`` lists every op's bytes and ``--live-at`` the buffers behind one op's: at every op of the default
    model's step (streamed rows, in-place kernels, workspaces) those buffers add up to the op's bytes and lie apart in
    the arena, and each kernel's own output is among them unless it overwrites its operand there."""
    from relax_passes import memory_plan
    from tvm_tinytrain.importers import load_model
    from tvm_tinytrain.trainer import build_training_module

    code, out, _ = run_cli(capsys, "memory", DEFAULT_MODEL, "--scheme", "last-k:6", "--num-classes", 5, "--json", "--timeline", "--live-at", "peak")
    r = json.loads(out)
    at = r["live_at"]
    assert code == 0 and at["index"] == r["peak_op"]["index"] and r["timeline"][at["index"]]["total"] == r["peak_live_bytes"]
    assert sum(b["size"] for b in at["buffers"]) == r["peak_live_bytes"] == max(row["total"] for row in r["timeline"])

    plan = memory_plan(build_training_module(load_model(str(DEFAULT_MODEL)), "last-k:6", 5))
    for row in plan.timeline:
        t = row["index"]
        live = plan.live_at(t)
        assert sum(b["size"] for b in live) == sum(v for k, v in row.items() if k not in ("index", "op", "node")), t
        spans = sorted((b["offset"], b["offset"] + b["size"]) for b in live if b["size"])
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), f"op {t}: live buffers overlap: {spans}"
        assert all(b["written_at"] <= t <= b["last_read_at"] and plan.buffers[b["buffer"]]["name"] == b["name"] for b in live)
        outputs = {i for i, (b, span) in enumerate(zip(plan.buffers, plan.live_spans)) if b["start"] == t and span is not None and b["kind"] != "workspace"}
        assert outputs <= {b["buffer"] for b in live} | {i for i, b in enumerate(plan.buffers) if b["overwrites"] is not None}, t
    with pytest.raises(TinyTrainError, match="op index 64 is out of range: the step has ops 0..63"):
        plan.live_at(len(plan.timeline))

    code, out, _ = run_cli(capsys, "memory", DEFAULT_MODEL, "--scheme", "last-k:6", "--num-classes", 5, "--timeline", "--live-at", 23)
    assert code == 0 and "op   23 softmax_cross_entropy" in out and "alive at op 23 (softmax_cross_entropy loss):" in out


def test_memory_live_at_past_the_last_op(capsys):
    code, _, err = run_cli(capsys, "memory", DEFAULT_MODEL, "--scheme", "last-k:6", "--num-classes", 5, "--live-at", 9999)
    assert code == 2 and err.strip() == "tinytrain: error: --live-at 9999: op index 9999 is out of range: the step has ops 0..63"


def _memory_with_and_without(capsys, scheme: str, flag: str) -> tuple[dict, dict]:
    """``tinytrain memory`` of the default model with the pass options' defaults and with ``flag``; the flag must not
    leak into a later command."""
    args = ("memory", DEFAULT_MODEL, "--scheme", scheme, "--num-classes", 5, "--json")
    default = json.loads(run_cli(capsys, *args)[1])
    flagged = json.loads(run_cli(capsys, *args, flag)[1])
    assert json.loads(run_cli(capsys, *args)[1]) == default
    return default, flagged


def test_memory_with_the_trained_expansion_fused(capsys):
    """The pass option fuse_trained_expansion (on by default) lowers the default model's last-k:6 step, whose peak
    without it (--no-fuse-trained-expansion) is the depthwise input gradient in front of block 4's trained expansion."""
    fused, plain = _memory_with_and_without(capsys, "last-k:6", "--no-fuse-trained-expansion")
    assert plain["peak_op"]["node"] == "block4.dw" and fused["peak_sram_bytes"] < plain["peak_sram_bytes"]


def test_memory_with_the_masks_recomputed(capsys, tmp_path):
    """The pass option recompute_masks (on by default) drops the clamp masks of block 4, whose expansion is trained
    whole; --no-recompute-masks keeps them, for more memory at the peak."""
    scheme = tmp_path / "expansion.json"
    scheme.write_text(json.dumps({"n_bias_update": 6, "weight_idx": [10], "weight_ratio": [1.0]}))
    recomputed, stored = _memory_with_and_without(capsys, str(scheme), "--no-recompute-masks")
    assert recomputed["peak_sram_bytes"] < stored["peak_sram_bytes"]
    assert recomputed["peak_op"]["mask"] < stored["peak_op"]["mask"]


def test_memory_with_the_residual_gradient_read_through_its_mask(capsys):
    """The pass option masked_reads (on by default) lowers bias-only:7, whose peak with --no-masked-reads is block 3's
    fused backward holding the masked copy of the residual gradient besides the gradient itself."""
    masked, copied = _memory_with_and_without(capsys, "bias-only:7", "--no-masked-reads")
    assert copied["peak_op"]["node"].startswith("block3.project") and masked["peak_sram_bytes"] < copied["peak_sram_bytes"]
    assert masked["peak_op"]["gradient"] < copied["peak_op"]["gradient"]


def test_memory_with_the_frozen_layers_streamed(capsys):
    """The pass option stream_layers (on by default) runs the default model's frozen first blocks row by row in
    bias-only:4, whose peak without it (--no-stream-layers) is block 1's expansion + depthwise conv, whole."""
    streamed, plain = _memory_with_and_without(capsys, "bias-only:4", "--no-stream-layers")
    assert plain["peak_op"]["op"] == "expand_depthwise" and streamed["peak_sram_bytes"] < plain["peak_sram_bytes"]


def test_memory_with_the_streamed_expansion_recomputed(capsys):
    """The pass option recompute_streamed_expansion: in bias-only:1 the default model peaks in its streamed layers,
    where recomputing block 1's expansion ("always") saves 512 bytes, under the 1 KB the default (at-peak) asks."""
    default, always = _memory_with_and_without(capsys, "bias-only:1", "--recompute-streamed-expansion=always")
    never = _memory_with_and_without(capsys, "bias-only:1", "--recompute-streamed-expansion=never")[1]
    assert default == never and always["peak_sram_bytes"] == default["peak_sram_bytes"] - 512
    assert default["peak_op"]["op"] == "add_int8_rows"


def test_memory_with_masks_checkpointed(capsys):
    """The pass option checkpoint_masks: with the full update the default model holds its clamp masks from the
    forward through its backward; at its default (at-peak) the pass makes some of them again from checkpoints where
    that lowers the peak, "never" keeps them all."""
    default, never = _memory_with_and_without(capsys, "full", "--checkpoint-masks=never")
    assert default["peak_sram_bytes"] <= never["peak_sram_bytes"] - 1024
    assert default["parts"]["peak_mask_bytes"] < never["parts"]["peak_mask_bytes"]


def test_memory_with_the_residual_backward_in_place(capsys):
    """The pass option residual_backward_in_place: under bias-only:13 the default model peaks, with "never", at its
    residual block 1's backward (the block's output gradient and the branch's input gradient alive together); at the
    default (at-peak) that block writes the sum over the output gradient, in bands of rows."""
    default, never = _memory_with_and_without(capsys, "bias-only:13", "--residual-backward-in-place=never")
    assert never["peak_op"]["node"].startswith("block1.") and never["peak_op"]["op"] == "depthwise_block_backward"
    assert default["peak_sram_bytes"] <= never["peak_sram_bytes"] - 1024
    assert default["peak_op"]["gradient"] < never["peak_op"]["gradient"]


def test_train_on_npz_data(capsys, tiny_pkl, tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 24)
    images = np.zeros((24, 3, 16, 16), np.int8)
    images[np.arange(24), labels] = 100  # the class is which channel is bright: learnable
    data = tmp_path / "d.npz"
    np.savez(data, images=images, labels=labels)
    code, out, err = run_cli(capsys, "train", tiny_pkl, "--scheme", "bias-only:2", "--data", data, "--epochs", "2",
                             "--num-classes", "3", "--lr", "0.01", "--json", "--save", tmp_path / "w.npz", "--accumulate", "2")
    assert code == 0, err
    log = json.loads(out)
    assert len(log["epochs"]) == 2 and "epoch 2/2" in err
    assert log["epochs"][-1]["mean_loss"] < log["epochs"][0]["mean_loss"]
    saved = np.load(tmp_path / "w.npz")
    assert saved["classifier_weight"].shape == (3, 8) and saved["first_conv_weight"].dtype == np.int8


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((4, 3, 15, 16), np.int8), "labels": np.zeros(4, int)}, "'images' must be int8 \\(N, 3, 16, 16\\)"),
    ({"images": np.zeros((4, 3, 16, 16), np.int8), "labels": np.array([0, 1, 2, 7])}, "'labels' must be in \\[0, 2\\], found 0..7"),
    ({"images": np.zeros((4, 3, 16, 16), np.int8)}, "missing array 'labels'"),
])
def test_bad_training_data(capsys, tiny_pkl, tmp_path, arrays, message):
    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    code, _, err = run_cli(capsys, "train", tiny_pkl, "--data", data, "--num-classes", "3")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err)


def test_bad_scheme_cli(capsys, tiny_pkl):
    code, _, err = run_cli(capsys, "memory", tiny_pkl, "--scheme", "last-k:9")
    assert code == 2 and "field 'n_bias_update' = 9 must be in [0, 4]" in err


def test_budget_that_cannot_fit_names_the_overflow(capsys, tiny_pkl):
    code, out, _ = run_cli(capsys, "memory", tiny_pkl, "--scheme", "full", "--json")
    peak = json.loads(out)["peak_sram_bytes"]
    code, _, err = run_cli(capsys, "memory", tiny_pkl, "--scheme", "full", "--budget", str(peak - 100))
    assert code == 2 and f"needs {peak} bytes" in err and "100 bytes over the budget" in err
    code, _, _ = run_cli(capsys, "memory", tiny_pkl, "--scheme", "full", "--budget", str(peak))
    assert code == 0
    with pytest.raises(SystemExit):
        main(["memory", str(tiny_pkl), "--budget", "lots"])
    assert "expected bytes such as" in capsys.readouterr().err
