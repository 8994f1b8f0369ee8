"""Writer of a :class:`~tvm_tinytrain.model.Model` as a QDQ int8 ONNX model.

The graph is the standard QDQ form (float input -> QuantizeLinear ->
DequantizeLinear -> float op -> QuantizeLinear -> ...), so any ONNX runtime
simulates the int8 model, and :func:`.onnx_import.load_onnx` reads it back
to the same Model: weights, biases, zero points and clamps are stored exactly,
and the exact Python-float scales go into the metadata entry
:data:`~.onnx_import.SCALES_METADATA_KEY` besides the float32 scales that
ONNX can hold.

Naming follows the importer's rule (a Model tensor is the float tensor a
QuantizeLinear quantizes): the float result of each node is named after its
Model tensor, its int8 form ``<tensor>/quantized`` and the float tensor that
consumers read ``<tensor>/dequantized``.  A clamp tighter than int8 becomes
a Relu (``qmin == zero point``, ``qmax == 127``) or a Clip whose bounds are
``(qmin - zero) * scale`` and ``(qmax - zero) * scale``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..model import Add, Conv2D, GlobalAvgPool, Linear, Model
from ..quant import INT8_MAX, INT8_MIN
from .onnx_import import QDQ_OPSET, SCALES_METADATA_KEY

BATCH = "N"  # symbolic batch dimension of the graph input and output


class _Writer:
    """Emits the ONNX nodes and initializers of one Model, node by node."""

    def __init__(self, model: Model):
        self.model = model
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.float_of: dict[str, str] = {}  # Model tensor -> float ONNX tensor its consumers read

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def quantize(self, tensor: str) -> None:
        """QuantizeLinear + DequantizeLinear of the float tensor ``tensor`` with its Model params."""
        q = self.model.tensors[tensor].quant
        s = self.init(f"{tensor}/scale", np.float32(q.scale))
        z = self.init(f"{tensor}/zero_point", np.int8(q.zero_point))
        self.op("QuantizeLinear", [tensor, s, z], f"{tensor}/quantized", f"{tensor}/QuantizeLinear")
        self.float_of[tensor] = self.op("DequantizeLinear", [f"{tensor}/quantized", s, z], f"{tensor}/dequantized",
                                        f"{tensor}/DequantizeLinear")

    def dequantized_const(self, base: str, data: np.ndarray, scale: np.ndarray) -> str:
        """An int8 weight or int32 bias with per-output-channel scales (axis 0)."""
        inputs = [self.init(f"{base}_quantized", data), self.init(f"{base}_scale", scale.astype(np.float32))]
        return self.op("DequantizeLinear", inputs, base, f"{base}/DequantizeLinear", axis=0)

    def weight_and_bias(self, node: Conv2D | Linear) -> list[str]:
        x_scale = self.model.tensors[node.input].quant.scale
        bias_scale = np.float64(x_scale) * node.weight_scales.astype(np.float64)
        return [self.dequantized_const(f"{node.name}/weight", node.weight, node.weight_scales),
                self.dequantized_const(f"{node.name}/bias", node.bias, bias_scale)]

    def compute(self, node, op_type: str, inputs: list[str], **attrs) -> None:
        """The float op of ``node``, its clamp (Relu/Clip) and the Q/DQ of its output tensor."""
        clamp = self.clamp_op(node)
        raw = node.output if clamp is None else f"{node.output}/preactivation"
        self.op(op_type, inputs, raw, node.name, **attrs)
        if clamp is not None:
            self.op(clamp[0], [raw, *clamp[1]], node.output, f"{node.name}/{clamp[0]}")
        self.quantize(node.output)

    def clamp_op(self, node) -> tuple[str, list[str]] | None:
        """The activation that makes the importer recover ``(qmin, qmax)``, or None for the full int8 range."""
        qmin, qmax = getattr(node, "qmin", INT8_MIN), getattr(node, "qmax", INT8_MAX)
        q = self.model.tensors[node.output].quant
        if (qmin, qmax) == (INT8_MIN, INT8_MAX):
            return None
        if qmin == q.zero_point and qmax == INT8_MAX:
            return "Relu", []
        lo = self.init(f"{node.name}/clip_min", np.float32((qmin - q.zero_point) * q.scale))
        hi = self.init(f"{node.name}/clip_max", np.float32((qmax - q.zero_point) * q.scale))
        return "Clip", [lo, hi]

    def conv(self, node: Conv2D) -> None:
        k, p = node.kernel, node.padding
        self.compute(node, "Conv", [self.float_of[node.input], *self.weight_and_bias(node)],
                     kernel_shape=[k, k], pads=[p] * 4, strides=[node.stride] * 2, dilations=[1, 1], group=node.groups)

    def add(self, node: Add) -> None:
        self.compute(node, "Add", [self.float_of[node.lhs], self.float_of[node.rhs]])

    def pool(self, node: GlobalAvgPool) -> None:
        """GlobalAveragePool keeps (N, C, 1, 1); the Flatten after the Q/DQ gives consumers (N, C)."""
        self.compute(node, "GlobalAveragePool", [self.float_of[node.input]])
        dq = self.float_of[node.output]
        self.float_of[node.output] = self.op("Flatten", [dq], f"{node.output}/flattened", f"{node.name}/Flatten", axis=1)

    def linear(self, node: Linear) -> None:
        x = self.float_of[node.input]
        if node.is_float:
            w = self.init(f"{node.name}/weight", node.weight)
            b = self.init(f"{node.name}/bias", node.bias)
            self.float_of[node.output] = self.op("Gemm", [x, w, b], node.output, node.name, transB=1)
        else:
            self.compute(node, "Gemm", [x, *self.weight_and_bias(node)], transB=1)

    def graph(self) -> onnx.GraphProto:
        m = self.model
        self.quantize(m.input)
        emit = {Conv2D: self.conv, Add: self.add, GlobalAvgPool: self.pool, Linear: self.linear}
        for node in m.nodes:
            emit[type(node)](node)
        out_shape = m.output_info.shape
        return helper.make_graph(
            self.nodes, m.name,
            [helper.make_tensor_value_info(m.input, TensorProto.FLOAT, [BATCH, *m.input_info.shape])],
            [helper.make_tensor_value_info(self.float_of[m.output], TensorProto.FLOAT, [BATCH, *out_shape])],
            self.inits,
        )


def export_onnx(model: Model, path=None) -> onnx.ModelProto:
    """The Model as a QDQ int8 ONNX model (opset :data:`~.onnx_import.QDQ_OPSET`), also saved to ``path`` if given.

    The graph input is the float image ``(N, C, H, W)``; the output is the
    dequantized int8 result of the last node, or a float32 classifier's logits.
    """
    model.validate()
    proto = helper.make_model(_Writer(model).graph(), opset_imports=[helper.make_opsetid("", QDQ_OPSET)],
                              producer_name="tvm-tinytrain")
    proto.ir_version = 9  # the IR version that introduced opset 19; newer ones shut out older runtimes
    scales = {name: float(info.quant.scale) for name, info in model.tensors.items() if info.quant is not None}
    helper.set_model_props(proto, {SCALES_METADATA_KEY: json.dumps(scales)})
    if path is not None:
        onnx.save(proto, str(path))
    return proto
