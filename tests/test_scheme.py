"""Sparse-update schemes: presets, JSON files, channel selection and errors naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_random_model, paper_model_path

from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.importers.paper_pkl import load_paper_model
from tvm_tinytrain.scheme import PAPER_SCHEMES, SparseScheme, layer_updates, parse_scheme, selected_channels


@pytest.fixture(scope="module")
def model():
    return make_random_model(0)  # 6 convs


def test_presets(model):
    full = parse_scheme("full", model)
    assert full.n_bias_update == 6 and full.weight_idx == tuple(range(6))
    assert parse_scheme("bias-only:2", model) == SparseScheme(2)
    lastk = parse_scheme("last-k:2", model)
    assert lastk.weight_idx == (4, 5) and lastk.n_bias_update == 2
    ups = layer_updates(lastk, model)
    assert [u.bias for u in ups] == [False] * 4 + [True] * 2
    assert [u.channels is None for u in ups] == [True] * 4 + [False] * 2


def test_paper_presets_drop_zero_ratios():
    model = load_paper_model(paper_model_path("mcunet-5fps"))
    s = parse_scheme("paper-49kb", model)
    assert s.weight_idx == (24, 27, 30) and s.weight_ratio == (0.25, 0.5, 0.5) and s.n_bias_update == 20
    for label in PAPER_SCHEMES["mcunet-5fps"]:
        parse_scheme(f"paper-{label}", model)
    ups = layer_updates(parse_scheme("paper-99kb", model), model)
    conv36 = model.convs()[36]
    assert len(ups[36].channels) == round(0.125 * conv36.in_channels)


def test_json_scheme(tmp_path, model):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"n_bias_update": 3, "weight_idx": [4], "weight_ratio": [0.5]}))
    s = parse_scheme(str(path), model)
    assert s.n_bias_update == 3 and s.weight_idx == (4,) and s.weight_ratio == (0.5,)


def test_channel_selection_takes_largest_magnitude(model):
    conv = model.convs()[3]  # b0.project, 16 -> 8 channels, 1x1
    conv = type(conv)(**{**conv.__dict__, "weight": conv.weight.copy()})
    conv.weight[:] = 1
    conv.weight[:, 11] = 100
    conv.weight[:, 2] = -90
    assert selected_channels(conv, 2 / 16) == (11, 2)
    assert selected_channels(conv, 0.01) == (11,)  # at least one channel
    dw = model.convs()[2]
    mags = np.abs(dw.weight.astype(int)).sum(axis=(1, 2, 3))
    assert set(selected_channels(dw, 0.25)) == set(np.argsort(-mags, kind="stable")[:4])


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "unknown scheme 'nonsense'"),
    ("paper-99kb", "published schemes exist only for"),
    ("bias-only:x", "N must be an integer"),
    ("bias-only:7", "field 'n_bias_update' = 7 must be in \\[0, 6\\]"),
    ("last-k:9", "field 'n_bias_update' = 9"),
])
def test_bad_scheme_names(model, spec, message):
    with pytest.raises(TinyTrainError, match=message):
        parse_scheme(spec, model)


@pytest.mark.parametrize("content, message", [
    ({"n_bias_update": 1, "weight_idx": [6], "weight_ratio": [1]}, "conv index 6, out of range \\[0, 5\\]"),
    ({"n_bias_update": 1, "weight_idx": [2], "weight_ratio": [0]}, "'weight_ratio' for conv 2 is 0.0, must be in \\(0, 1\\]"),
    ({"n_bias_update": 1, "weight_idx": [2], "weight_ratio": [1.5]}, "must be in \\(0, 1\\]"),
    ({"n_bias_update": 1, "weight_idx": [2, 3], "weight_ratio": [1]}, "must have the same length"),
    ({"n_bias_update": 1, "weight_idx": [2, 2], "weight_ratio": [1, 1]}, "lists a conv twice"),
    ({"weight_idx": [], "weight_ratio": []}, "missing field 'n_bias_update'"),
    ({"n_bias_update": "3", "weight_idx": [], "weight_ratio": []}, "field 'n_bias_update' must be int"),
    ([1, 2], "must hold a JSON object"),
    ({"n_bias_update": 1, "weight_idx": [2.7], "weight_ratio": [1]}, "field 'weight_idx' has 2.7, not an integer"),
    ({"n_bias_update": 1, "weight_idx": [float("nan")], "weight_ratio": [1]}, "field 'weight_idx' has nan, not an integer"),
    ({"n_bias_update": 1, "weight_idx": [2], "weight_ratio": ["1"]}, "field 'weight_ratio' has '1', not a number"),
    ({"n_bias_update": 1, "weight_idx": [2], "weight_ratio": [True]}, "field 'weight_ratio' has True, not a number"),
    ({"n_bias_update": 1, "weight_idx": [2], "weight_ratios": [1]}, "unknown field 'weight_ratios'"),
])
def test_bad_scheme_files(tmp_path, model, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(TinyTrainError, match=message):
        parse_scheme(str(path), model)


@pytest.mark.parametrize("content", [b"{oops", bytes(range(128, 256)), b"[" * 100000 + b"]" * 100000])
def test_scheme_file_not_json(tmp_path, model, content):
    """Bad JSON, bytes that are not UTF-8, and nesting too deep for the parser."""
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(TinyTrainError, match="scheme file .*x.json: not valid JSON"):
        parse_scheme(str(path), model)
