"""The ``tinytrain`` CLI: inspect and predict, their JSON, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import paper_model_path, write_archive
from PIL import Image

from tvm_tinytrain.cli import main
from tvm_tinytrain.importers import load_model
from tvm_tinytrain.ops import reference
from tvm_tinytrain.preprocess import load_image


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_json_of_tiny_model(capsys, tiny_pkl):
    code, out, _ = run_cli(capsys, "inspect", tiny_pkl, "--json")
    assert code == 0
    s = json.loads(out)
    layers = s["layers"]
    assert [r["type"] for r in layers] == ["conv2d", "conv2d", "depthwise_conv2d", "conv2d", "add", "global_avg_pool", "linear_int8"]
    stem = layers[0]
    assert stem["output"] == [8, 8, 8] and stem["kernel"] == 3 and stem["stride"] == 2
    assert stem["macs"] == 8 * 8 * 8 * 3 * 9 and stem["params"] == 8 * 3 * 9 + 8
    assert stem["activation_bytes"] == 3 * 16 * 16 + 8 * 8 * 8
    assert s["totals"]["convs"] == 4
    assert s["totals"]["macs"] == sum(r["macs"] for r in layers)


def test_inspect_table(capsys, tiny_pkl):
    code, out, _ = run_cli(capsys, "inspect", tiny_pkl)
    assert code == 0 and "blocks[0].depthwise" in out and "total: 4 convs" in out


def test_predict_json_matches_reference(capsys, tiny_pkl, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    code, out, _ = run_cli(capsys, "predict", tiny_pkl, *paths, "--top", "3", "--json")
    assert code == 0
    res = json.loads(out)
    model = load_model(tiny_pkl)
    for r, p in zip(res, paths):
        want = reference.run_model(model, load_image(p, (16, 16))[None])[0]
        assert r["logits"] == want.tolist()
        assert r["top"] == list(np.argsort(-want.astype(int), kind="stable")[:3])


def test_preprocess_centre_crop_and_offset(tmp_path):
    img = np.zeros((40, 20, 3), np.uint8)
    img[10:30] = 200  # the centre square is uniform 200, the rest 0
    p = tmp_path / "tall.png"
    Image.fromarray(img).save(p)
    x = load_image(p, (8, 8))
    assert x.shape == (3, 8, 8) and x.dtype == np.int8
    assert np.all(x == 200 - 128)


@pytest.mark.parametrize("argv, message", [
    (["inspect", "{tmp}/missing.pkl"], "missing.pkl: file not found"),
    (["predict", "{tiny}", "{tmp}/missing.png"], "missing.png: cannot read image"),
    (["inspect", "{tmp}/evil.pkl"], "disallowed global"),
])
def test_errors_are_one_line_without_traceback(tmp_path, tiny_pkl, argv, message):
    write_archive(tmp_path / "evil.pkl", b"cos\nsystem\n(Vtrue\ntR.")
    argv = [a.format(tmp=tmp_path, tiny=tiny_pkl) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "tvm_tinytrain.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["train", "{tiny}", "--epochs", "-1"], "argument --epochs: -1 must be in [1, 2147483647]"),
    (["train", "{tiny}", "--lr", "nan"], "argument --lr: nan must be in"),
    (["build", "{tiny}", "-o", "{tmp}/b", "--lr", "-0.1"], "argument --lr: -0.1 must be in"),
    (["memory", "{tiny}", "--budget", "1e400"], "argument --budget: budget '1e400' must be at least 1 byte and finite"),
    (["memory", "{tiny}", "--budget", "0.5"], "must be at least 1 byte"),
    (["memory", "{tiny}", "--live-at", "top"], "argument --live-at: 'top': expected 'peak' or an op index (0 or more)"),
    (["memory", "{tiny}", "--live-at", "-3"], "argument --live-at: -3 must be in [0, 2147483647]"),
    (["run", "{tmp}", "--steps", "0"], "argument --steps: 0 must be in [1, 2147483647]"),
    (["run", "{tmp}", "--eval-count", "-1"], "argument --eval-count: -1 must be in [0, 2147483647]"),
    (["run", "{tmp}", "--timeout", "0"], "argument --timeout: 0 must be in [0.001, 604800] (up to a week)"),
    (["run", "{tmp}", "--timeout", "1e300"], "argument --timeout: 1e300 must be in"),
    (["run", "{tmp}", "--steps", "5000000000"], "argument --steps: 5000000000 must be in [1, 2147483647]"),
    (["run", "{tmp}", "--lr", "1e300"], "argument --lr: 1e300 must be in [1.17549e-38, 3.40282e+38] (a positive float32)"),
    (["train", "{tiny}", "--seed", "-1"], "argument --seed: -1 must be in [0, 2147483647]"),
    (["search", "{tiny}", "--budget", "9KB", "-o", "{tmp}/s.json", "--jobs", "0"], "argument --jobs: 0 must be in [1, 2147483647]"),
])
def test_bad_numbers_are_refused_naming_the_option(capsys, tmp_path, tiny_pkl, argv, message):
    with pytest.raises(SystemExit) as stop:
        main([a.format(tmp=tmp_path, tiny=tiny_pkl) for a in argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "{tiny}", "--save", "{tmp}/nowhere/w.npz"], "--save {tmp}/nowhere/w.npz: {tmp}/nowhere is not a folder"),
    (["train", "{tiny}", "--save", "{tmp}"], "--save {tmp}: is a folder; give a file name"),
    (["memory", "{tiny}", "--plot", "{tmp}/nowhere/t.png"], "--plot {tmp}/nowhere/t.png: {tmp}/nowhere is not a folder"),
    (["memory", "{tiny}", "--plot", "{tmp}/t.txt"], "--plot {tmp}/t.txt: expected a file name ending in .png or .svg or .pdf"),
    (["search", "{tiny}", "--budget", "9KB", "-o", "{tmp}"], "-o {tmp}: is a folder"),
    (["export", "{tmp}/build", "--onnx", "{tmp}/a_file/m.onnx"], "--onnx {tmp}/a_file/m.onnx: {tmp}/a_file is not a folder"),
    (["build", "{tiny}", "-o", "{tmp}/a_file"], "-o {tmp}/a_file: cannot be the build folder: {tmp}/a_file is a file"),
    (["build", "{tiny}", "-o", "{tmp}/a_file/sub"], "-o {tmp}/a_file/sub: cannot be the build folder: {tmp}/a_file is a file"),
    (["train", "{tiny}", "--num-classes", "3", "--data", "{tmp}/cut.npz"], "cut.npz: cannot read data (.npz)"),
    (["train", "{tiny}", "--num-classes", "3", "--data", "{tmp}/objects.npz"], "objects.npz: cannot read data (.npz)"),
    (["train", "{tiny}", "--num-classes", "3", "--data", "{tmp}/empty.npz"], "empty.npz: 'images' holds no images"),
    (["run", "{tmp}/build", "--steps", "1"], "tinytrain_build.json: damaged"),
    (["run", "{tmp}/build_no_classes", "--steps", "1"], "tinytrain_build.json: field 'num_classes' missing or not int"),
])
def test_bad_paths_and_files_fail_before_any_work(capsys, tmp_path, tiny_pkl, argv, message):
    """Each a one-line error naming the option or file (output paths are checked before a minutes-long job)."""
    (tmp_path / "a_file").write_text("")
    images = np.zeros((4, 3, 16, 16), np.int8)
    np.savez(tmp_path / "ok.npz", images=images, labels=np.arange(4) % 3)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:200])
    np.savez(tmp_path / "objects.npz", images=np.array([images, None], dtype=object), labels=np.arange(2))
    np.savez(tmp_path / "empty.npz", images=images[:0], labels=np.zeros(0, int))
    for folder, text in (("build", "garbage{"), ("build_no_classes", json.dumps({"model_path": "m", "target": "host", "scheme": "full"}))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "tinytrain_build.json").write_text(text)
    code, _, err = run_cli(capsys, *[a.format(tmp=tmp_path, tiny=tiny_pkl) for a in argv])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert message.format(tmp=tmp_path) in err


def test_inspect_paper_model_totals(capsys):
    code, out, _ = run_cli(capsys, "inspect", paper_model_path("mcunet-5fps"), "--json")
    totals = json.loads(out)["totals"]
    assert code == 0 and totals["convs"] == 42 and round(totals["macs"] / 1e6, 1) == 22.6


def test_predict_paper_model_on_sample_images(capsys):
    import sklearn.datasets

    images = sklearn.datasets.__path__[0] + "/images"
    code, out, _ = run_cli(capsys, "predict", paper_model_path("mcunet-5fps"), f"{images}/flower.jpg", f"{images}/china.jpg", "--json")
    res = json.loads(out)
    assert code == 0 and len(res) == 2 and all(len(r["logits"]) == 1000 and len(r["top"]) == 5 for r in res)
    assert res[1]["labels"][0] in {"church", "monastery", "palace", "bell tower", "dome", "mosque", "stupa"}
