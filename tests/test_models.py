"""Whole-model int8 inference: TVM (llvm) == numpy reference byte for byte; the Relax graph is real int8."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PAPER_MODELS, make_random_model, paper_model_path
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from tvm_tinytrain.errors import ShapeError
from tvm_tinytrain.importers.paper_pkl import load_paper_model
from tvm_tinytrain.model import with_input_size
from tvm_tinytrain.ops import reference
from tvm_tinytrain.preprocess import image_to_int8
from tvm_tinytrain.relax_build import build_relax
from tvm_tinytrain.runtime import CompiledModel
from tvm_tinytrain.summary import model_summary

PAPER_TOTALS = {"mcunet-5fps": (42, 22.6e6), "mbv2-w0.35": (51, 16.8e6), "proxyless-w0.3": (60, 18.7e6)}
# daisy, yellow lady's slipper, rapeseed, rose hip, sea anemone, bee, butterflies, artichoke, cardoon, flowerpot
FLOWER_LIKE = {985, 986, 984, 989, 108, 309, 321, 322, 323, 324, 325, 326, 944, 946, 738}
BUILDINGS = {497, 663, 698, 442, 538, 668, 832, 483, 449, 437, 873, 406, 624, 825}


@given(st.integers(0, 1000), st.booleans(), st.integers(1, 2), st.sampled_from([9, 16]))
@settings(max_examples=6, deadline=None)
def test_random_models_match_reference(seed, float_head, batch, size):
    model = make_random_model(seed, size=size, float_head=float_head)
    compiled = CompiledModel(model, batch=batch)
    x = np.random.default_rng(seed).integers(-128, 128, (batch, 3, size, size)).astype(np.int8)
    got = compiled(x)
    assert got.dtype == (np.float32 if float_head else np.int8)
    np.testing.assert_array_equal(got, reference.run_model(model, x))


def _tensor_dtypes(func) -> set[str]:
    dtypes = set()

    def visit(expr):
        if isinstance(expr, relax.Expr) and isinstance(expr.ty, relax.TensorType):
            dtypes.add(str(expr.ty.dtype))

    relax.analysis.post_order_visit(func.body, visit)
    for p in func.params:
        visit(p)
    return dtypes


def test_relax_graph_is_int8_without_fake_quantization():
    mod, params = build_relax(make_random_model(3))
    main = mod["main"]
    assert _tensor_dtypes(main) == {"int8", "int32"}, "an int8 model must carry only int8/int32 tensors"
    calls = []
    relax.analysis.post_order_visit(main.body, lambda e: calls.append(e.op.name) if isinstance(e, relax.Call) else None)
    assert set(calls) == {"relax.call_tir"}
    assert {str(v.dtype) for k, v in params.items() if k.endswith("weight")} == {"int8"}
    assert {str(v.dtype) for k, v in params.items() if k.endswith("bias")} == {"int32"}
    assert int(main.attrs["num_input"]) == 1


def test_wrong_input_shape_is_a_clear_error():
    compiled = CompiledModel(make_random_model(1))
    with pytest.raises(ShapeError, match=r"expects int8 \(1, 3, 16, 16\), got int8 \(1, 3, 17, 16\)"):
        compiled(np.zeros((1, 3, 17, 16), np.int8))
    with pytest.raises(ShapeError, match="got float32"):
        compiled(np.zeros((1, 3, 16, 16), np.float32))


@pytest.fixture(scope="module", params=PAPER_MODELS)
def paper(request):
    model = load_paper_model(paper_model_path(request.param))
    return request.param, model, CompiledModel(model)


def test_paper_model_matches_reference_on_random_and_sample_images(paper):
    from sklearn.datasets import load_sample_image

    name, model, compiled = paper
    rng = np.random.default_rng(0)
    inputs = [rng.integers(-128, 128, (1, 3, 128, 128)).astype(np.int8) for _ in range(2)]
    inputs += [image_to_int8(load_sample_image(f), (128, 128))[None] for f in ("flower.jpg", "china.jpg")]
    for x in inputs:
        got = compiled(x)
        assert got.dtype == np.int8 and got.shape == (1, 1000)
        np.testing.assert_array_equal(got, reference.run_model(model, x))


def test_paper_model_inspect_totals(paper):
    name, model, _ = paper
    totals = model_summary(model)["totals"]
    convs, macs = PAPER_TOTALS[name]
    assert totals["convs"] == convs
    assert abs(totals["macs"] - macs) / macs < 0.01


def test_paper_model_predicts_plausible_classes(paper):
    from sklearn.datasets import load_sample_image

    _, _, compiled = paper
    top = {}
    for f in ("flower.jpg", "china.jpg"):
        logits = compiled(image_to_int8(load_sample_image(f), (128, 128))[None])[0].astype(int)
        top[f] = list(np.argsort(-logits, kind="stable")[:5])
    assert FLOWER_LIKE & set(top["flower.jpg"]), top
    assert top["china.jpg"][0] in BUILDINGS, top


def test_with_input_size_rederives_every_activation_shape():
    model = make_random_model(3, size=16)
    same = with_input_size(model, (16, 16))
    assert same.tensors == model.tensors and same.nodes == model.nodes
    big = with_input_size(model, (32, 24))
    assert big.input_info.shape == (3, 32, 24)
    for node in model.convs():
        c, h, w = model.tensors[node.output].shape
        assert big.tensors[node.output].shape == (c, 2 * h, w * 3 // 2)
    x = np.random.default_rng(0).integers(-128, 128, (2, 3, 32, 24), dtype=np.int8)
    assert reference.run_model(big, x).shape == (2, 10)
    assert model.input_info.shape == (3, 16, 16)  # the original is untouched
    with pytest.raises(ShapeError, match="must be positive"):
        with_input_size(model, (0, 16))
