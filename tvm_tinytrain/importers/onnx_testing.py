"""Small fp32 ONNX CNNs and a float evaluator, for tests and scripts.

:func:`make_fp32_cnn` builds, with ``onnx.helper`` only, the kind of network
the importer targets (a MobileNetV2-like stem, inverted residual blocks and a
pooled classifier), so the ONNX path can be exercised without any framework.
:func:`float_forward` runs such a model with onnx's own reference evaluator,
which is independent of our importer's calibration code.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


class CnnBuilder:
    """Accumulates nodes and He-initialised initializers; every node's output is named after the node."""

    def __init__(self, rng: np.random.Generator, channels: int):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits = [numpy_helper.from_array(np.float32(0.0), "relu6_min"),
                      numpy_helper.from_array(np.float32(6.0), "relu6_max")]
        self.channels = channels

    def _param(self, name: str, shape: tuple[int, ...], std: float) -> str:
        self.inits.append(numpy_helper.from_array(self.rng.normal(0.0, std, shape).astype(np.float32), name))
        return name

    def conv(self, name: str, x: str, out_ch: int, kernel: int, stride: int = 1, depthwise: bool = False) -> str:
        groups = self.channels if depthwise else 1
        out_ch = self.channels if depthwise else out_ch
        fan_in = self.channels // groups * kernel * kernel
        w = self._param(f"{name}.weight", (out_ch, self.channels // groups, kernel, kernel), np.sqrt(2.0 / fan_in))
        b = self._param(f"{name}.bias", (out_ch,), 0.1)
        pad = (kernel - 1) // 2
        self.nodes.append(helper.make_node("Conv", [x, w, b], [name], name=name, kernel_shape=[kernel, kernel],
                                           pads=[pad] * 4, strides=[stride, stride], group=groups))
        self.channels = out_ch
        return name

    def act(self, name: str, x: str, relu6: bool) -> str:
        if relu6:
            self.nodes.append(helper.make_node("Clip", [x, "relu6_min", "relu6_max"], [name], name=name))
        else:
            self.nodes.append(helper.make_node("Relu", [x], [name], name=name))
        return name

    def block(self, name: str, x: str, expand: int, out_ch: int, stride: int) -> str:
        """MobileNetV2 inverted residual: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 project (+ Add)."""
        in_ch = self.channels
        y = self.act(f"{name}.expand_relu6", self.conv(f"{name}.expand", x, in_ch * expand, 1), True)
        y = self.act(f"{name}.dw_relu6", self.conv(f"{name}.dw", y, self.channels, 3, stride, depthwise=True), True)
        y = self.conv(f"{name}.project", y, out_ch, 1)
        if stride == 1 and in_ch == out_ch:
            self.nodes.append(helper.make_node("Add", [x, y], [f"{name}.add"], name=f"{name}.add"))
            y = f"{name}.add"
        return y

    def head(self, x: str, num_classes: int) -> str:
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten", axis=1))
        w = self._param("classifier.weight", (num_classes, self.channels), np.sqrt(1.0 / self.channels))
        b = self._param("classifier.bias", (num_classes,), 0.1)
        self.nodes.append(helper.make_node("Gemm", ["flatten", w, b], ["logits"], name="classifier", transB=1))
        return "logits"


def make_fp32_cnn(seed: int = 0, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> onnx.ModelProto:
    """A small fp32 MobileNetV2-style CNN: stem conv (3x3 s2 + ReLU), a residual block, a stride-2 block, pooled Gemm head.

    Input ``input`` is float32 ``(N, *input_shape)``, output ``logits`` ``(N, num_classes)``.
    """
    c, h, w = input_shape
    b = CnnBuilder(np.random.default_rng(seed), c)
    x = b.act("stem_relu", b.conv("stem", "input", 16, 3, 2), relu6=False)
    x = b.block("block1", x, expand=2, out_ch=16, stride=1)
    x = b.block("block2", x, expand=3, out_ch=24, stride=2)
    out = b.head(x, num_classes)
    graph = helper.make_graph(
        b.nodes, f"fp32_cnn_{seed}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", num_classes])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tvm-tinytrain")
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def float_forward(model_proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Output of an ONNX model (float input) on ``x``, by ``onnx.reference.ReferenceEvaluator``."""
    from onnx.reference import ReferenceEvaluator

    initializers = {i.name for i in model_proto.graph.initializer}
    (name,) = [i.name for i in model_proto.graph.input if i.name not in initializers]
    return ReferenceEvaluator(model_proto).run(None, {name: np.asarray(x, dtype=np.float32)})[0]
