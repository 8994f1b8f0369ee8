"""The paper's .pkl reader: safe unpickling and clear errors for bad files."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from conftest import conv_dict, paper_dict, write_archive
from test_backward_ops import conv_real

from tvm_tinytrain.errors import ModelFormatError, UnsupportedOpError
from tvm_tinytrain.importers import load_model
from tvm_tinytrain.importers.paper_pkl import load_paper_model
from tvm_tinytrain.ops import reference


def test_tiny_paper_file_imports_and_runs(tmp_path):
    path = write_archive(tmp_path / "tiny.pkl", pickle.dumps(paper_dict(), protocol=2))
    model = load_model(path)
    assert [n.op for n in model.nodes] == ["conv2d"] * 4 + ["add", "global_avg_pool", "linear"]
    assert model.convs()[2].depthwise
    out = reference.run_model(model, np.zeros((1, 3, 16, 16), np.int8))
    assert out.shape == (1, 10) and out.dtype == np.int8


def _paper_layer(d: dict, node: str) -> dict:
    """The file's dict of layer ``node`` (``blocks[0].depthwise`` -> d["blocks"][0]["depthwise"])."""
    if node.startswith("blocks["):
        index, _, part = node[len("blocks["):].partition("].")
        return d["blocks"][int(index)][part]
    return d[node]


def _paper_conv(x: np.ndarray, layer: dict) -> np.ndarray:
    """PAPER.md section 1's conv, in float64 from the file's fields: zero padding after subtracting x_zero, the int32
    bias added, ``round(acc * x_scale * w_scales[o] / y_scale) + y_zero`` clamped to int8."""
    p = layer["params"]
    acc = conv_real(x.astype(np.float64) - p["x_zero"], p["weight"].astype(np.float64), layer["stride"], layer["groups"])
    acc += p["bias"].astype(np.float64)[None, :, None, None]
    scale = p["x_scale"] * p["w_scales"].astype(np.float64) / p["y_scale"]
    return np.clip(np.round(acc * scale[None, :, None, None]) + p["y_zero"], -128, 127)


def test_tiny_paper_file_means_what_paper_md_says(tmp_path):
    """Each node of the imported model, on the int8 values its inputs have, within one step of PAPER.md section 1's
    semantics computed from the file's own fields (fixed-point requantization may round a tie the other way)."""
    d = paper_dict(seed=3)
    model = load_model(write_archive(tmp_path / "tiny.pkl", pickle.dumps(d, protocol=2)))
    x = np.random.default_rng(0).integers(-128, 128, (2, 3, 16, 16)).astype(np.int8)
    values = reference.run_model(model, x, keep=True)
    for node in model.nodes:
        ins = [values[t] for t in node.inputs]
        if node.op == "conv2d":
            want = _paper_conv(ins[0], _paper_layer(d, node.name))
        elif node.op == "add":
            rp, b_params = _paper_layer(d, node.name)["params"], _paper_layer(d, "blocks[0].pointwise2")["params"]
            real = (ins[0].astype(np.float64) - rp["x_zero"]) * rp["x_scale"] + (ins[1].astype(np.float64) - b_params["y_zero"]) * b_params["y_scale"]
            want = np.clip(np.round(real / rp["y_scale"]) + rp["y_zero"], -128, 127)
        elif node.op == "global_avg_pool":
            want = np.round(ins[0].astype(np.float64).mean(axis=(2, 3)))
        else:  # the classifier: a 1x1 conv on the pooled vector
            want = _paper_conv(ins[0][:, :, None, None], d["classifier"])[:, :, 0, 0]
        got = values[node.output].astype(np.float64)
        assert np.abs(got - want).max() <= 1, node.name
        assert np.mean((got > -128) & (got < 127)) > 0.3, f"{node.name}: mostly saturated, a weak check"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_disallowed_global_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    d = paper_dict()
    d["first_conv"]["act"] = _Evil(marker)
    path = write_archive(tmp_path / "evil.pkl", pickle.dumps(d, protocol=2))
    with pytest.raises(ModelFormatError, match=r"evil\.pkl.*disallowed global '(posix|os)\.system'"):
        load_paper_model(path)
    assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path):
    payload = b"cbuiltins\neval\n(V1+1\ntR."
    with pytest.raises(ModelFormatError, match="disallowed global 'builtins.eval'"):
        load_paper_model(write_archive(tmp_path / "eval.pkl", payload))


def test_truncated_archive(tmp_path):
    good = write_archive(tmp_path / "good.pkl", pickle.dumps(paper_dict(), protocol=2)).read_bytes()
    bad = tmp_path / "truncated.pkl"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelFormatError, match=r"truncated\.pkl: not a readable model archive"):
        load_paper_model(bad)


def test_truncated_pickle_stream(tmp_path):
    data = pickle.dumps(paper_dict(), protocol=2)
    with pytest.raises(ModelFormatError, match=r"cut\.pkl: corrupt pickle"):
        load_paper_model(write_archive(tmp_path / "cut.pkl", data[: len(data) // 3]))


def test_not_a_zip(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(paper_dict()))
    with pytest.raises(ModelFormatError, match=r"plain\.pkl: not a readable model archive"):
        load_paper_model(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(ModelFormatError, match="nope.pkl: file not found"):
        load_model(tmp_path / "nope.pkl")
    with pytest.raises(ModelFormatError, match="unknown model format '.h5'"):
        load_model(tmp_path / "model.h5")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("classifier"), r"missing field 'model.classifier'"),
    (lambda d: d["blocks"][0]["depthwise"]["params"].pop("w_scales"), r"missing field 'blocks\[0\].depthwise.params.w_scales'"),
    (lambda d: d["blocks"][0]["depthwise"].__setitem__("stride", "2"), r"field 'blocks\[0\].depthwise.stride' must be int"),
    (lambda d: d["first_conv"]["params"].__setitem__("weight", np.zeros((8, 3, 3, 3), np.float32)),
     r"field 'first_conv.params.weight' must be a 4-D int8 array, got 4-D float32"),
    (lambda d: d["blocks"][0]["pointwise2"]["params"].__setitem__("bias", np.zeros(5, np.int32)),
     r"node 'blocks\[0\].pointwise2' \(conv2d\): field 'bias' must have shape \(8,\)"),
    (lambda d: d["blocks"][0]["depthwise"]["params"].__setitem__("x_zero", 7),
     r"'blocks\[0\].depthwise.params' input quantization .* does not match tensor 'blocks\[0\].pointwise1'"),
    (lambda d: d.__setitem__("blocks", "oops"), r"field 'model.blocks' must be list/tuple, got str"),
    (lambda d: d["blocks"][0]["depthwise"].__setitem__("stride", 0), r"field 'blocks\[0\].depthwise.stride' = 0 must be at least 1"),
    (lambda d: d["blocks"][0]["depthwise"].__setitem__("kernel_size", []), r"field 'blocks\[0\].depthwise.kernel_size' = \[\] must be"),
    (lambda d: d["first_conv"].__setitem__("in_shape", 0), r"field 'first_conv.in_shape' = 0 must be in \[1, 4096\]"),
    (lambda d: d["first_conv"].__setitem__("in_shape", 10**7), r"field 'first_conv.in_shape' = 10000000 must be in"),
])
def test_missing_or_mistyped_fields(tmp_path, mutate, message):
    d = paper_dict()
    mutate(d)
    with pytest.raises(ModelFormatError, match=message):
        load_paper_model(write_archive(tmp_path / "bad.pkl", pickle.dumps(d, protocol=2)))


def test_unsupported_kernel_names_the_node(tmp_path):
    d = paper_dict()
    rng = np.random.default_rng(1)
    d["blocks"][0]["depthwise"] = conv_dict(rng, 16, 16, 8, k=4, depthwise=True, xq=(0.04, -128), yq=(0.03, -128))
    with pytest.raises(UnsupportedOpError, match=r"node 'blocks\[0\].depthwise' \(conv2d\): kernel size 4 not supported"):
        load_paper_model(write_archive(tmp_path / "k4.pkl", pickle.dumps(d, protocol=2)))


def test_pickle_protocols_load_identically(tmp_path):
    outs = []
    for proto in (2, 4, 5):
        model = load_paper_model(write_archive(tmp_path / f"p{proto}.pkl", pickle.dumps(paper_dict(), protocol=proto)))
        outs.append(reference.run_model(model, np.full((1, 3, 16, 16), 17, np.int8)))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
