"""The paper's .pkl reader: safe unpickling and clear errors for bad files."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from conftest import conv_dict, paper_dict, write_archive

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
