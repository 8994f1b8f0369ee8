"""ONNX import (QDQ and fp32 + calibration), export, and their error messages.

The int8 Model is checked against onnx's own ReferenceEvaluator running the
QDQ graph (which rounds half to even in float32 where our reference uses
fixed point, so single-LSB differences are allowed on a few elements), and
the PTQ result against the float model it came from.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from conftest import PAPER_MODELS, make_random_model, paper_model_path
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from tvm_tinytrain.errors import ModelFormatError, ShapeError, UnsupportedOpError
from tvm_tinytrain.importers.onnx_export import export_onnx
from tvm_tinytrain.importers.onnx_import import SCALES_METADATA_KEY, load_onnx, quantize_fp32
from tvm_tinytrain.importers.onnx_testing import float_forward, make_fp32_cnn
from tvm_tinytrain.model import Add, Conv2D, GlobalAvgPool, Linear
from tvm_tinytrain.ops.reference import run_model, run_node

FAST = settings(max_examples=6, deadline=None)


# ---- helpers --------------------------------------------------------------------


def quantize_input(model, x: np.ndarray) -> np.ndarray:
    q = model.input_info.quant
    return np.clip(np.round(x / q.scale) + q.zero_point, -128, 127).astype(np.int8)


def dequantize_input(model, x: np.ndarray) -> np.ndarray:
    q = model.input_info.quant
    return ((x.astype(np.float32) - q.zero_point) * np.float32(q.scale)).astype(np.float32)


def output_real(model, y: np.ndarray) -> np.ndarray:
    q = model.output_info.quant
    return y.astype(np.float64) if q is None else (y.astype(np.float64) - q.zero_point) * q.scale


def assert_close_in_lsb(ours: np.ndarray, theirs: np.ndarray, lsb: float) -> None:
    """Rounding (half-even float vs fixed point) may move a few elements by one step; a real bug moves many."""
    d = np.abs(ours - theirs) / lsb
    assert (d <= 1.001).mean() >= 0.95, f"only {(d <= 1.001).mean():.1%} of elements within 1 LSB"
    assert d.max() <= 3.001, f"max difference {d.max():.2f} LSB"


def assert_nodes_match_onnx(model, proto, x: np.ndarray, int8_name=lambda t: f"{t}/quantized") -> None:
    """Each Model node, fed the int8 tensors onnx's evaluator computed, reproduces its int8 output within 1 LSB.

    Node by node, so that a 1-LSB rounding difference is not amplified by the
    layers after it; ``int8_name`` maps a Model tensor to its QuantizeLinear output.
    """
    feeds = {model.input: dequantize_input(model, x)}
    onnx_values = ReferenceEvaluator(proto).run(None, feeds, intermediate=True)

    def int8(t):
        v = onnx_values[int8_name(t)]
        v = v.astype(np.int16) - 128 if v.dtype == np.uint8 else v
        return v.reshape(len(x), *model.tensors[t].shape).astype(np.int8)

    for node in model.nodes:
        ours = run_node(model, node, {t: int8(t) for t in node.inputs})
        if model.tensors[node.output].dtype == "float32":
            assert np.allclose(ours, onnx_values[node.output], rtol=1e-4, atol=1e-4), node.name
            continue
        d = np.abs(ours.astype(np.int16) - int8(node.output))
        assert d.max() <= 1, f"{node.name}: differs by {d.max()}"
        # a mean over few pixels hits exact halves often (ONNX rounds them to even, we round up)
        allowed = 0.5 if isinstance(node, GlobalAvgPool) else 0.05
        assert (d != 0).sum() <= max(2, allowed * d.size), f"{node.name}: {(d != 0).mean():.1%} differ by 1"


def assert_same_model(a, b) -> None:
    assert (a.input, a.output) == (b.input, b.output)
    assert a.tensors == b.tensors  # names, shapes, dtypes, exact scales and zero points
    assert [type(n) for n in a.nodes] == [type(n) for n in b.nodes]
    for x, y in zip(a.nodes, b.nodes):
        for field, v in vars(x).items():
            w = getattr(y, field)
            if isinstance(v, np.ndarray):
                assert v.dtype == w.dtype and np.array_equal(v, w), f"{x.name}.{field}"
            else:
                assert v == w, f"{x.name}.{field}: {v!r} != {w!r}"


def random_images(rng, n: int, shape) -> np.ndarray:
    return rng.normal(size=(n, *shape)).astype(np.float32)


# ---- (a) fp32 model + calibration --------------------------------------------------


def test_ptq_agrees_with_the_float_model():
    fp32 = make_fp32_cnn(seed=0)
    rng = np.random.default_rng(1)
    model = load_onnx(fp32, random_images(rng, 64, (3, 32, 32)))
    assert [type(n) for n in model.nodes] == [Conv2D] * 4 + [Add] + [Conv2D] * 3 + [GlobalAvgPool, Linear]
    x = random_images(rng, 64, (3, 32, 32))
    want = float_forward(fp32, x)
    got = output_real(model, run_model(model, quantize_input(model, x)))
    # Relative to the logits' variation across inputs (their common offset would hide errors);
    # a transposed kernel or a mis-ordered classifier gives > 1.
    assert np.linalg.norm(got - want) / np.linalg.norm(want - want.mean(0)) < 0.3
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.85


def test_ptq_weights_biases_and_folded_activations():
    fp32 = make_fp32_cnn(seed=3)
    model = load_onnx(fp32, random_images(np.random.default_rng(0), 16, (3, 32, 32)))
    inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    for node in model.nodes:
        if isinstance(node, (Conv2D, Linear)):
            w, b = inits[f"{node.name}.weight"], inits[f"{node.name}.bias"]
            s = node.weight_scales.reshape(-1, *[1] * (w.ndim - 1))
            assert np.all(np.abs(node.weight * s - w) <= s / 2 * 1.001), node.name
            assert np.allclose(np.abs(node.weight).reshape(len(w), -1).max(1), 127)  # scale = max|w| / 127
            bias_scale = model.tensors[node.input].quant.scale * node.weight_scales.astype(np.float64)
            assert np.all(np.abs(node.bias * bias_scale - b) <= bias_scale / 2 * 1.001), node.name
    relu6 = model.tensors["block1.dw_relu6"].quant
    assert relu6.zero_point == -128 and abs(relu6.scale * 255 - 6.0) < 1e-3  # calibrated range [0, 6]
    assert model.node("stem").qmin == model.tensors["stem_relu"].quant.zero_point


def test_ptq_of_an_all_zero_channel():
    """A dead channel (zero weights and bias) gets a tiny positive scale, validates, and outputs real 0."""
    fp32 = make_fp32_cnn(seed=4, input_shape=(3, 8, 8))
    for init in fp32.graph.initializer:
        if init.name in ("stem.weight", "stem.bias"):
            arr = numpy_helper.to_array(init).copy()
            arr[0] = 0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    rng = np.random.default_rng(4)
    model = load_onnx(fp32, random_images(rng, 8, (3, 8, 8)))
    stem = model.node("stem")
    assert 0 < stem.weight_scales[0] < 1e-9 and not stem.weight[0].any() and stem.bias[0] == 0
    out = run_model(model, quantize_input(model, random_images(rng, 2, (3, 8, 8))), keep=True)["stem_relu"]
    assert np.all(out[:, 0] == model.tensors["stem_relu"].quant.zero_point)


def test_ptq_of_a_matmul_head_and_constant_nodes():
    """The same network with MatMul + Add for its classifier and Constant nodes for the ReLU6 bounds."""
    fp32 = make_fp32_cnn(seed=2)
    variant = copy.deepcopy(fp32)
    g = variant.graph
    weight = next(i for i in g.initializer if i.name == "classifier.weight")
    weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), weight.name))
    bounds = [i for i in g.initializer if i.name.startswith("relu6_")]
    constants = [helper.make_node("Constant", [], [i.name], value=i) for i in bounds]
    for i in bounds:
        g.initializer.remove(i)
    head = [helper.make_node("MatMul", ["flatten", "classifier.weight"], ["fc"], name="classifier"),
            helper.make_node("Add", ["fc", "classifier.bias"], ["logits"], name="classifier_bias")]
    nodes = [*constants, *(n for n in g.node if n.op_type != "Gemm"), *head]
    del g.node[:]
    g.node.extend(nodes)
    rng = np.random.default_rng(2)
    model = load_onnx(variant, random_images(rng, 32, (3, 32, 32)))
    assert isinstance(model.node("classifier"), Linear) and model.output == "logits"
    x = random_images(rng, 32, (3, 32, 32))
    want = float_forward(fp32, x)
    got = output_real(model, run_model(model, quantize_input(model, x)))
    assert np.linalg.norm(got - want) / np.linalg.norm(want - want.mean(0)) < 0.3


@FAST
@given(seed=st.integers(0, 2**16), c=st.integers(1, 4), h=st.integers(3, 17), w=st.integers(3, 17), classes=st.integers(2, 12))
def test_ptq_model_matches_its_qdq_graph(seed, c, h, w, classes):
    fp32 = make_fp32_cnn(seed=seed, input_shape=(c, h, w), num_classes=classes)
    rng = np.random.default_rng(seed)
    cal = random_images(rng, 8, (c, h, w))
    qdq = quantize_fp32(fp32, cal)
    onnx.checker.check_model(qdq, full_check=True)
    model = load_onnx(qdq)
    assert model.input_info.shape == (c, h, w) and model.output_info.shape == (classes,)
    assert_nodes_match_onnx(model, qdq, quantize_input(model, random_images(rng, 8, (c, h, w))))


# ---- (b) export -> import is lossless --------------------------------------------------


def with_clamps(model, rng):
    """Give some nodes clamps tighter than int8 (ReLU-like and arbitrary) so export must write them."""
    for node in model.nodes:
        if not hasattr(node, "qmin") or getattr(node, "is_float", False):
            continue
        zero = model.tensors[node.output].quant.zero_point
        kind = rng.integers(0, 4)
        if kind == 1:
            node.qmin = zero
        elif kind == 2:
            node.qmin, node.qmax = zero, int(rng.integers(zero, 127))
        elif kind == 3:
            node.qmin, node.qmax = sorted(int(v) for v in rng.integers(-128, 128, 2))
    return model.validate()


@FAST
@given(seed=st.integers(0, 2**16), size=st.integers(5, 16), float_head=st.booleans())
def test_export_import_round_trip_is_lossless(seed, size, float_head):
    rng = np.random.default_rng(seed)
    model = with_clamps(make_random_model(seed, size=size, float_head=float_head), rng)
    proto = export_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    back = load_onnx(proto)
    assert_same_model(model, back)
    x = rng.integers(-128, 128, (4, *model.input_info.shape)).astype(np.int8)
    ours = run_model(model, x)
    assert np.array_equal(ours, run_model(back, x)) and ours.dtype == run_model(back, x).dtype
    assert_nodes_match_onnx(model, proto, x)  # the exported graph means the same to any ONNX runtime


def test_exact_scales_survive_float32_storage(tmp_path):
    model = make_random_model(7)
    info = model.tensors["b0.add"]
    model.tensors["b0.add"] = type(info)(info.name, info.shape, info.dtype, type(info.quant)(0.1, 3))
    path = tmp_path / "m.onnx"
    proto = export_onnx(model, path)
    scale_init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}["b0.add/scale"]
    assert scale_init.dtype == np.float32 and scale_init == np.float32(0.1)
    assert load_onnx(path).tensors["b0.add"].quant.scale == 0.1
    del proto.metadata_props[:]  # without the metadata the float32 value is all there is
    assert load_onnx(proto).tensors["b0.add"].quant.scale == float(np.float32(0.1))
    assert any(p.key == SCALES_METADATA_KEY for p in onnx.load(path).metadata_props)


def test_ptq_model_round_trips_through_a_file(tmp_path):
    fp32 = make_fp32_cnn(seed=5, input_shape=(3, 16, 16))
    model = load_onnx(fp32, random_images(np.random.default_rng(5), 8, (3, 16, 16)), name="ptq")
    export_onnx(model, tmp_path / "ptq.onnx")
    back = load_onnx(tmp_path / "ptq.onnx")
    assert back.name == "ptq"
    assert_same_model(model, back)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_paper_models_round_trip(name):
    from tvm_tinytrain.importers.paper_pkl import load_paper_model

    model = load_paper_model(paper_model_path(name))
    proto = export_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    back = load_onnx(proto)
    assert_same_model(model, back)
    x = np.random.default_rng(0).integers(-128, 128, (1, *model.input_info.shape)).astype(np.int8)
    assert np.array_equal(run_model(model, x), run_model(back, x))


# ---- (c) a hand-built QDQ model -------------------------------------------------------


class QdqGraph:
    """Builds a QDQ graph node by node, independently of the exporter; activations int8 or uint8."""

    def __init__(self, rng, storage, qat=False):
        self.rng, self.storage, self.qat = rng, storage, qat
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, array) -> str:
        self.n += 1
        self.inits.append(numpy_helper.from_array(np.asarray(array), f"const{self.n}"))
        return f"const{self.n}"

    def qdq(self, x: str, scale: float, zero: int) -> str:
        """Q -> DQ of ``x`` with int8 params (stored shifted by +128 as uint8 when asked)."""
        z = np.uint8(zero + 128) if self.storage == np.uint8 else np.int8(zero)
        s, z = self.const(np.float32(scale)), self.const(z)
        self.nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{x}_q"], name=f"{x}_Q"))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{x}_q", s, z], [f"{x}_dq"], name=f"{x}_DQ"))
        return f"{x}_dq"

    def weight(self, shape, axis):
        w = self.rng.integers(-127, 128, shape).astype(np.int8)
        s = self.rng.uniform(0.005, 0.02, shape[axis]).astype(np.float32)
        out = f"w{self.n}"
        src = self.const(w)
        if self.qat:  # a float weight quantized by the graph itself, as QAT exports write it
            real = w * s.reshape([-1 if i == axis else 1 for i in range(len(shape))])
            src = f"{out}_int8"
            self.nodes.append(helper.make_node("QuantizeLinear", [self.const(real), self.const(s), self.const(np.zeros_like(s, np.int8))],
                                               [src], axis=axis))
        self.nodes.append(helper.make_node("DequantizeLinear", [src, self.const(s)], [out], axis=axis))
        return out, w, s

    def bias(self, x_scale, w_scale):
        b = self.rng.integers(-500, 500, len(w_scale)).astype(np.int32)
        out = f"b{self.n}"
        scale = (np.float32(x_scale) * w_scale).astype(np.float32)
        self.nodes.append(helper.make_node("DequantizeLinear", [self.const(b), self.const(scale)], [out], axis=0))
        return out, b

    def conv(self, name, x, x_scale, c_in, c_out, k, stride=1, depthwise=False):
        groups = c_in if depthwise else 1
        w, wq, ws = self.weight((c_out, c_in // groups, k, k), 0)
        b, bq = self.bias(x_scale, ws)
        p = (k - 1) // 2
        self.nodes.append(helper.make_node("Conv", [x, w, b], [name], name=name, kernel_shape=[k, k], pads=[p] * 4,
                                           strides=[stride] * 2, group=groups))
        return name, wq, bq

    def op(self, op_type, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name


def hand_built_qdq(storage, head: str, qat: bool = False):
    """Conv+Relu, depthwise s2 + Clip(0, 6), pointwise, residual Add, pool, classifier (``head`` picks its form)."""
    g = QdqGraph(np.random.default_rng(0), storage, qat)
    x = g.qdq("image", 0.02, 3)
    c1, w1, _ = g.conv("c1", x, 0.02, 3, 8, 3)
    x = g.qdq(g.op("Relu", [c1], "c1_relu"), 0.05, -100)
    dw, _, _ = g.conv("dw", x, 0.05, 8, 8, 3, stride=2, depthwise=True)
    dw_out = g.qdq(g.op("Clip", [dw, g.const(np.float32(0)), g.const(np.float32(6))], "dw_relu6"), 0.04, -120)
    pw, _, _ = g.conv("pw", dw_out, 0.04, 8, 8, 1)
    x = g.qdq(g.op("Add", [dw_out, g.qdq(pw, 0.06, 5)], "res"), 0.0837, -2)
    x = g.op("Flatten", [g.qdq(g.op("GlobalAveragePool", [x], "gap"), 0.05, 0)], "flat", axis=1)
    if head == "matmul":
        w, wq, ws = g.weight((8, 10), 1)
        y = g.op("Add", [g.op("MatMul", [x, w], "fc"), g.bias(0.05, ws)[0]], "fc_bias")
        want = {"fc": wq.T, "fc_scales": ws}
    elif head == "float_matmul":  # a float head given as plain float initializers
        w, b = g.rng.normal(0, 0.3, (8, 10)).astype(np.float32), g.rng.normal(0, 0.1, 10).astype(np.float32)
        y = g.op("Add", [g.op("MatMul", [x, g.const(w)], "fc"), g.const(b)], "fc_bias")
        want = {"fc": w.T, "fc_bias": b}
    else:  # Gemm, weight (O, I) with transB (gemm_t, float) or (I, O)
        w, wq, ws = g.weight((8, 10), 1) if head == "gemm" else g.weight((10, 8), 0)
        y = g.op("Gemm", [x, w, g.bias(0.05, ws)[0]], "fc", transB=int(head != "gemm"))
        want = {"fc": wq.T if head == "gemm" else wq, "fc_scales": ws}
    if not head.startswith("float"):
        y = g.qdq(y, 0.1, 4)
    graph = helper.make_graph(g.nodes, "hand_qdq", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 10])], g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return proto, {"c1": w1, **want}


@pytest.mark.parametrize("storage, head, qat", [
    *[(np.int8, head, False) for head in ("gemm_t", "gemm", "matmul", "float", "float_matmul")],
    (np.uint8, "gemm_t", False), (np.uint8, "float", False), (np.int8, "gemm", True), (np.uint8, "matmul", True),
])
def test_hand_built_qdq_model(storage, head, qat):
    proto, want = hand_built_qdq(storage, head, qat)
    model = load_onnx(proto)
    assert [n.name for n in model.nodes] == ["c1", "dw", "pw", "res", "gap", "fc"]
    assert model.input == "image" and model.input_info.quant.zero_point == 3 and model.input_info.shape == (3, 12, 12)
    assert np.array_equal(model.node("c1").weight, want["c1"])
    assert (model.node("c1").qmin, model.node("c1").qmax) == (-100, 127)  # Relu: qmin = output zero
    assert (model.node("dw").qmin, model.node("dw").qmax) == (-120, 30)  # Clip(0, 6) at scale 0.04
    assert model.node("dw").depthwise and model.node("dw").stride == 2
    assert model.node("res").inputs == ("dw_relu6", "pw")
    fc = model.node("fc")
    if head == "float":
        assert fc.is_float and model.output_info.dtype == "float32"
        assert np.allclose(fc.weight, want["fc"] * want["fc_scales"][:, None])  # the dequantized int8 weight
    elif head == "float_matmul":
        assert np.array_equal(fc.weight, want["fc"]) and np.array_equal(fc.bias, want["fc_bias"])
    else:
        assert np.array_equal(fc.weight, want["fc"]) and np.array_equal(fc.weight_scales, want["fc_scales"])
    rng = np.random.default_rng(1)
    x = quantize_input(model, rng.uniform(-2.5, 2.5, (16, 3, 12, 12)))
    ours = output_real(model, run_model(model, x))
    lsb = 0.05 * np.abs(fc.weight).max() if fc.is_float else model.output_info.quant.scale
    assert_close_in_lsb(ours, ReferenceEvaluator(proto).run(None, {"image": dequantize_input(model, x)})[0], lsb)
    assert_nodes_match_onnx(model, proto, x, lambda t: f"{t}_q")


# ---- (d) bad input -------------------------------------------------------------------------


def test_unsupported_op_names_node_and_op():
    fp32 = make_fp32_cnn()
    stem = fp32.graph.node[0]
    stem.op_type, stem.name = "LSTM", "conv_7"  # reported before onnx's checker sees its Conv attributes
    with pytest.raises(UnsupportedOpError, match=r"node 'conv_7' \(op 'LSTM'\): operator not supported"):
        load_onnx(fp32, np.zeros((1, 3, 32, 32), np.float32))
    stem.op_type, stem.domain = "Conv", "com.microsoft"
    with pytest.raises(UnsupportedOpError, match=r"node 'conv_7' \(op 'com.microsoft.Conv'\)"):
        load_onnx(fp32, np.zeros((1, 3, 32, 32), np.float32))
    proto, _ = hand_built_qdq(np.int8, "gemm_t")
    next(n for n in proto.graph.node if n.name == "c1_relu").op_type = "Tanh"
    with pytest.raises(UnsupportedOpError, match=r"node 'c1_relu' \(op 'Tanh'\)"):
        load_onnx(proto)


@pytest.mark.parametrize("content", [b"\x08\x07garbage\xff\xff\xff\xff", "truncated"])
def test_unreadable_file_names_it(tmp_path, content):
    path = tmp_path / "bad.onnx"
    data = make_fp32_cnn().SerializeToString()
    path.write_bytes(data[: len(data) // 3] if content == "truncated" else content)
    with pytest.raises(ModelFormatError, match="bad.onnx"):
        load_onnx(path, np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ModelFormatError, match="missing.onnx: file not found"):
        load_onnx(tmp_path / "missing.onnx")


def test_fp32_model_requires_calibration_of_the_right_shape():
    fp32 = make_fp32_cnn()
    with pytest.raises(ModelFormatError, match="calibration data is required"):
        load_onnx(fp32)
    with pytest.raises(ShapeError, match=r"\(N, 3, 32, 32\).*\(4, 3, 16, 16\)"):
        load_onnx(fp32, np.zeros((4, 3, 16, 16), np.float32))
    with pytest.raises(ShapeError, match=r"\(3, 32, 32\)"):
        load_onnx(fp32, np.zeros((3, 32, 32), np.float32))


def set_attr(proto, node_name, **attrs):
    node = next(n for n in proto.graph.node if n.name == node_name)
    for name, value in attrs.items():
        kept = [a for a in node.attribute if a.name != name and not (name == "auto_pad" and a.name == "pads")]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(name, value)])
    return proto


@pytest.mark.parametrize("node, attrs, message", [
    ("stem", {"pads": [0, 0, 1, 1]}, r"pads \[0, 0, 1, 1\]"),
    ("block1.dw", {"dilations": [2, 2]}, r"dilations \[2, 2\]"),
    ("stem", {"auto_pad": "SAME_UPPER"}, r"pads \[0, 0, 1, 1\]"),  # stride 2 on an even size: pads differ
    ("block1.expand", {"strides": [3, 3]}, r"strides \[3, 3\]"),
])
def test_unsupported_conv_attributes_name_the_node(node, attrs, message):
    proto = set_attr(make_fp32_cnn(), node, **attrs)
    with pytest.raises(UnsupportedOpError, match=rf"node '{node}' \(op 'Conv'\): {message}"):
        load_onnx(proto, np.zeros((2, 3, 32, 32), np.float32))


def test_same_upper_padding_with_stride_one_is_accepted():
    proto = set_attr(make_fp32_cnn(), "block1.dw", auto_pad="SAME_UPPER")
    assert load_onnx(proto, np.ones((2, 3, 32, 32), np.float32)).node("block1.dw").padding == 1


def test_qdq_structure_errors_name_the_node():
    proto, _ = hand_built_qdq(np.int8, "gemm_t")
    asym = copy.deepcopy(proto)
    c1 = next(n for n in asym.graph.node if n.name == "c1")
    next(n for n in asym.graph.node if n.output[0] == c1.input[1]).input.append("w_zero")
    asym.graph.initializer.append(numpy_helper.from_array(np.full(8, 2, np.int8), "w_zero"))
    with pytest.raises(UnsupportedOpError, match=r"node 'c1' \(op 'Conv'\): weight .* must be symmetric"):
        load_onnx(asym)
    requant = copy.deepcopy(proto)
    next(n for n in requant.graph.node if n.name == "c1_relu_DQ").input[1] = "other_scale"
    requant.graph.initializer.append(numpy_helper.from_array(np.float32(0.5), "other_scale"))
    with pytest.raises(UnsupportedOpError, match=r"node 'c1_relu_DQ' \(op 'DequantizeLinear'\): re-quantizes tensor 'c1_relu'"):
        load_onnx(requant)
