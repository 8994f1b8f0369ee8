"""The float32 mode: Relax forward vs an independent float64 numpy network, TVM's gradients vs finite differences, SGD, a paper model."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import make_random_model, paper_model_path
from numpy.lib.stride_tricks import sliding_window_view
from tvm import relax

from tvm_tinytrain.errors import ShapeError, UnsupportedOpError
from tvm_tinytrain.float_mode import FloatModeError, FloatTrainer, build_float_backbone, dequantize_model, real_input
from tvm_tinytrain.model import Add, Conv2D, GlobalAvgPool, Linear, Model
from tvm_tinytrain.ops.reference import run_model
from tvm_tinytrain.relax_build import param_name

CLASSES = 10
BATCH = 2


# ---- an independent float64 evaluation of the dequantized network ----------
def dequantized64(model) -> dict[str, np.ndarray]:
    """W = w_scale[o] * W̄ and b = x_scale * w_scale[o] * b̄ in float64, straight from the model's fields."""
    params = {}
    for node in model.nodes:
        if isinstance(node, Conv2D):
            s = node.weight_scales.astype(np.float64)
            params[param_name(node.name, "weight")] = node.weight * s[:, None, None, None]
            params[param_name(node.name, "bias")] = node.bias * s * model.tensors[node.input].quant.scale
    return params


def conv64(x, w, b, stride, groups):
    k = w.shape[2]
    pad = (k - 1) // 2
    win = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))), (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    cg, og = w.shape[1], w.shape[0] // groups
    out = [np.einsum("nchwij,ocij->nohw", win[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og]) for g in range(groups)]
    return np.concatenate(out, axis=1) + b[None, :, None, None]


def clamp64(model, node, v):
    q = model.tensors[node.output].quant
    return np.clip(v, (node.qmin - q.zero_point) * q.scale, (node.qmax - q.zero_point) * q.scale)


def node64(model, node, values, params):
    if isinstance(node, Conv2D):
        w, b = params[param_name(node.name, "weight")], params[param_name(node.name, "bias")]
        return clamp64(model, node, conv64(values[node.input], w, b, node.stride, node.groups))
    if isinstance(node, Add):
        return clamp64(model, node, values[node.lhs] + values[node.rhs])
    if isinstance(node, GlobalAvgPool):
        return values[node.input].mean(axis=(2, 3))
    assert isinstance(node, Linear)
    return values[node.input] @ params[param_name(node.name, "weight")].T + params[param_name(node.name, "bias")]


def logits64(model, params, x_real):
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    values = {model.input: np.asarray(x_real, np.float64)}
    for node in model.nodes:
        values[node.output] = node64(model, node, values, params)
    return values[model.output]


def loss64(model, params, x_real, labels):
    z = logits64(model, params, x_real)
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


def dequant(model, tensor, q):
    p = model.tensors[tensor].quant
    return (q.astype(np.float64) - p.zero_point) * p.scale


# ---- fixtures ----------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return make_random_model(0)


@pytest.fixture(scope="module")
def trainer(model):
    return FloatTrainer(model, CLASSES, lr=0.01, batch=BATCH, seed=3)


def images(seed, n, model, lo=-128, hi=128):
    return np.random.default_rng(seed).integers(lo, hi, (n, *model.input_info.shape)).astype(np.int8)


def run_backbone(model, params, x_real):
    mod, order = build_float_backbone(model, len(params[param_name("head", "bias")]), batch=None)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["backbone"](tvm.runtime.tensor(x_real), *(tvm.runtime.tensor(params[k]) for k in order)).numpy()


# ---- (a) forward -------------------------------------------------------------
def test_dequantize_matches_float64(model):
    fp = dequantize_model(model)
    ref = dequantized64(model)
    assert list(fp.params) == list(ref)
    for k, v in fp.params.items():
        assert v.dtype == np.float32
        np.testing.assert_allclose(v, ref[k], rtol=1e-6, err_msg=k)
    stem = model.tensors["stem"].quant
    assert fp.clamps["stem"] == pytest.approx((0.0, 255 * stem.scale))  # ReLU folded as y_zero = -128


def test_forward_matches_numpy_and_predict(model, trainer):
    """Identity head: the backbone's logits are the pooled features; then the trainer's own head via predict."""
    x = real_input(model, images(1, 5, model))
    params = {k: v.astype(np.float32) for k, v in dequantized64(model).items()}
    params[param_name("head", "weight")] = np.eye(12, dtype=np.float32)
    params[param_name("head", "bias")] = np.zeros(12, np.float32)
    np.testing.assert_allclose(run_backbone(model, params, x), logits64(model, params, x), rtol=1e-4, atol=1e-4)
    x8 = images(2, 3, model)
    np.testing.assert_allclose(trainer.predict(x8), logits64(model, trainer.state_dict(), real_input(model, x8)), rtol=1e-4, atol=1e-5)


def test_each_node_within_half_lsb_of_int8_reference(model):
    """Fed the int8 reference's dequantized inputs, every float node lands within rounding (0.5 LSB) of the int8 output."""
    x = images(4, 4, model)
    ref = run_model(model, x, keep=True)
    params = dequantized64(model)
    for node in model.nodes[:-1]:
        values = {t: dequant(model, t, ref[t]) for t in node.inputs}
        err = np.abs(node64(model, node, values, params) - dequant(model, node.output, ref[node.output]))
        assert err.max() <= 0.5 * model.tensors[node.output].quant.scale * (1 + 1e-6), node.name


@pytest.mark.parametrize("seed", [0, 2])
def test_pooled_features_match_int8_reference(seed):
    """End to end, per-node rounding compounds through the random int8 weights' large gains (1-8 % on seeds 0-9): allow 10 %."""
    m = make_random_model(seed)
    x = images(seed, 8, m)
    params = {k: v.astype(np.float32) for k, v in dequantized64(m).items()}
    params[param_name("head", "weight")] = np.eye(12, dtype=np.float32)
    params[param_name("head", "bias")] = np.zeros(12, np.float32)
    feats = run_backbone(m, params, real_input(m, x))
    ref = dequant(m, "pool", run_model(m, x, keep=True)["pool"])
    assert np.linalg.norm(feats - ref) <= 0.1 * np.linalg.norm(ref)


# ---- (b) gradients -----------------------------------------------------------
def test_gradients_match_finite_differences(model, trainer):
    x8, labels = images(5, BATCH, model), np.array([1, 7])
    x = real_input(model, x8)
    loss, grads = trainer.gradients(x8, labels)
    params = {k: v.astype(np.float64) for k, v in trainer.state_dict().items()}
    assert loss == pytest.approx(loss64(model, params, x, labels), rel=1e-5)
    assert list(grads) == list(params)
    rng = np.random.default_rng(0)
    eps = 1e-5
    for name, g in grads.items():
        assert np.abs(g).max() > 0, f"{name}: no gradient reaches it, the check would be vacuous"
        for idx in {np.unravel_index(np.abs(g).argmax(), g.shape), tuple(int(rng.integers(d)) for d in g.shape)}:
            p = params[name]
            old = p[idx]
            p[idx] = old + eps
            up = loss64(model, params, x, labels)
            p[idx] = old - eps
            down = loss64(model, params, x, labels)
            p[idx] = old
            fd = (up - down) / (2 * eps)
            assert g[idx] == pytest.approx(fd, rel=2e-3, abs=1e-4 * float(np.abs(g).max())), (name, idx)


# ---- (c) SGD -----------------------------------------------------------------
def test_sgd_learns_separable_task_and_keeps_frozen_params(model):
    """Two classes told apart by which image half is bright; only the head and the last conv train.

    The random model's pooled features are large (~20) and mostly shared by both classes, so a small lr keeps SGD stable.
    """
    n = 8
    labels = np.arange(n) % 2
    x = images(6, n, model, -20, 20).astype(np.int16)
    half = model.input_info.shape[2] // 2
    x[labels == 0, :, :half] += 90
    x[labels == 1, :, half:] += 90
    x = x.astype(np.int8)
    trainable = {param_name(k, f) for k in ("head", "b1.project") for f in ("weight", "bias")}
    tr = FloatTrainer(model, 2, lr=0.003, batch=n, seed=1, trainable=trainable)
    before = tr.state_dict()
    losses = [tr.step(x, labels) for _ in range(8)]
    after = tr.state_dict()
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.85 * losses[0], losses
    assert tr.evaluate(x, labels, batch=3) == 1.0
    for k in before:
        assert np.array_equal(before[k], after[k]) != (k in trainable), k


# ---- errors ------------------------------------------------------------------
def test_bad_inputs_raise_naming_the_field(model, trainer):
    with pytest.raises(ShapeError, match="images"):
        trainer.step(images(0, BATCH, model).astype(np.float32), [0, 1])
    with pytest.raises(ShapeError, match="batch 2"):
        trainer.step(images(0, 3, model), [0, 1, 2])
    with pytest.raises(FloatModeError, match="labels"):
        trainer.step(images(0, BATCH, model), [0, CLASSES])
    with pytest.raises(FloatModeError, match="trainable"):
        build_float_backbone(model, CLASSES, trainable={"nope"})
    with pytest.raises(FloatModeError, match="num_classes"):
        build_float_backbone(model, 1)
    with pytest.raises(UnsupportedOpError, match="Linear classifier"):
        build_float_backbone(Model("headless", "input", "pool", model.tensors, model.nodes[:-1]), CLASSES)


# ---- (d) a paper model -------------------------------------------------------
def test_paper_model_trains_one_step():
    from tvm_tinytrain.importers.paper_pkl import load_paper_model

    model = load_paper_model(paper_model_path("mcunet-5fps"))
    tr = FloatTrainer(model, 10, lr=0.01, batch=1)
    assert tr.state_dict()[param_name("classifier", "weight")].shape == (10, model.tensors["pool"].shape[0])
    loss = tr.step(images(0, 1, model), [3])
    assert np.isfinite(loss) and loss == pytest.approx(np.log(10), rel=0.2)
