"""Shared fixtures: the paper's model files (when ../shared is beside the repo) and small random models."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tvm_tinytrain.model import Add, Conv2D, GlobalAvgPool, Linear, Model, QuantParams, TensorInfo, conv_out_hw

REPO = Path(__file__).resolve().parents[1]
PAPER_MODELS_DIR = Path(os.environ.get("TINYTRAIN_PAPER_MODELS", REPO.parent / "shared" / "models"))
PAPER_MODELS = ["mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3"]


def paper_model_path(name: str) -> Path:
    path = PAPER_MODELS_DIR / f"{name}.pkl"
    if not path.exists():
        pytest.skip(f"paper model {path} not present (set TINYTRAIN_PAPER_MODELS)")
    return path


def random_quant(rng) -> QuantParams:
    return QuantParams(float(rng.uniform(0.01, 0.2)), int(rng.integers(-20, 20)))


def random_conv(rng, name, inp, tensors, out_ch, kernel=3, stride=1, depthwise=False, relu=False) -> Conv2D:
    c, h, w = tensors[inp].shape
    groups = c if depthwise else 1
    out_ch = c if depthwise else out_ch
    weight = rng.integers(-127, 128, (out_ch, c // groups, kernel, kernel)).astype(np.int8)
    yq = random_quant(rng)
    if relu:
        yq = QuantParams(yq.scale, -128)
    tensors[name] = TensorInfo(name, (out_ch, *conv_out_hw(h, w, kernel, stride)), "int8", yq)
    return Conv2D(name, inp, name, weight, rng.integers(-3000, 3000, out_ch).astype(np.int32),
                  rng.uniform(0.002, 0.02, out_ch).astype(np.float32), stride, groups)


def make_random_model(seed: int = 0, size: int = 16, channels: int = 3, classes: int = 10, float_head: bool = False) -> Model:
    """A small MobileNetV2-like int8 model: conv, inverted residual block with add, strided block, pool, classifier."""
    rng = np.random.default_rng(seed)
    tensors = {"input": TensorInfo("input", (channels, size, size), "int8", QuantParams(1 / 127.5, 0))}
    nodes = [random_conv(rng, "stem", "input", tensors, 8, 3, 2, relu=True)]
    nodes.append(random_conv(rng, "b0.expand", "stem", tensors, 16, 1, relu=True))
    nodes.append(random_conv(rng, "b0.dw", "b0.expand", tensors, 16, 5, 1, depthwise=True, relu=True))
    nodes.append(random_conv(rng, "b0.project", "b0.dw", tensors, 8, 1))
    tensors["b0.add"] = TensorInfo("b0.add", tensors["stem"].shape, "int8", random_quant(rng))
    nodes.append(Add("b0.add", "stem", "b0.project", "b0.add"))
    nodes.append(random_conv(rng, "b1.dw", "b0.add", tensors, 8, 7, 2, depthwise=True))
    nodes.append(random_conv(rng, "b1.project", "b1.dw", tensors, 12, 1))
    tensors["pool"] = TensorInfo("pool", (12,), "int8", tensors["b1.project"].quant)
    nodes.append(GlobalAvgPool("pool", "b1.project", "pool"))
    if float_head:
        tensors["logits"] = TensorInfo("logits", (classes,), "float32")
        nodes.append(Linear("head", "pool", "logits", rng.normal(0, 0.3, (classes, 12)).astype(np.float32),
                            rng.normal(0, 0.1, classes).astype(np.float32)))
    else:
        tensors["logits"] = TensorInfo("logits", (classes,), "int8", random_quant(rng))
        nodes.append(Linear("head", "pool", "logits", rng.integers(-127, 128, (classes, 12)).astype(np.int8),
                            rng.integers(-500, 500, classes).astype(np.int32), rng.uniform(0.002, 0.02, classes).astype(np.float32)))
    return Model(f"random{seed}", "input", "logits", tensors, nodes).validate()


# ---- the paper's .pkl format, written by the tests themselves ----
def conv_dict(rng, cin, cout, size, k=3, stride=1, depthwise=False, xq=(0.02, 0), yq=(0.03, -128)):
    groups = cin if depthwise else 1
    return {
        "in_channel": cin, "out_channel": cout, "in_shape": size, "out_shape": size // stride,
        "kernel_size": (k, k), "stride": stride, "groups": groups, "depthwise": depthwise, "act": None,
        "params": {
            "weight": rng.integers(-127, 128, (cout, cin // groups, k, k)).astype(np.int8),
            "bias": rng.integers(-1000, 1000, cout).astype(np.int32),
            "x_scale": xq[0], "x_zero": xq[1], "y_scale": yq[0], "y_zero": yq[1],
            "w_scales": rng.uniform(0.001, 0.01, cout).astype(np.float32),
        },
    }


def paper_dict(seed=0):
    """A tiny model in the paper's file format: stem, one residual inverted block, classifier."""
    rng = np.random.default_rng(seed)
    stem = conv_dict(rng, 3, 8, 16, stride=2, xq=(1 / 127.5, 0), yq=(0.05, -128))
    pw1 = conv_dict(rng, 8, 16, 8, k=1, xq=(0.05, -128), yq=(0.04, -128))
    dw = conv_dict(rng, 16, 16, 8, depthwise=True, xq=(0.04, -128), yq=(0.03, -128))
    pw2 = conv_dict(rng, 16, 8, 8, k=1, xq=(0.03, -128), yq=(0.06, 3))
    res = {"in_channel": 8, "in_shape": 8, "params": {"x_scale": 0.05, "x_zero": -128, "y_scale": 0.07, "y_zero": -5}}
    cls = conv_dict(rng, 8, 10, 1, k=1, xq=(0.07, -5), yq=(0.1, 0))
    block = {"pointwise1": pw1, "depthwise": dw, "pointwise2": pw2, "residual": res, "se": None}
    return {"first_conv": stem, "blocks": [block], "feature_mix": None, "classifier": cls}


def write_archive(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    return path


@pytest.fixture
def tiny_pkl(tmp_path) -> Path:
    return write_archive(tmp_path / "tiny.pkl", pickle.dumps(paper_dict(), protocol=2))
