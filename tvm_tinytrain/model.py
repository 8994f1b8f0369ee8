"""The small, typed description of an int8 CNN that every importer produces.

A :class:`Model` is a topologically ordered list of nodes over named tensors.
Activation tensors are int8 with per-tensor affine quantization (``real =
scale * (q - zero_point)``); weights are symmetric per-output-channel int8 with
int32 biases (``real_bias = x_scale * w_scale[o] * bias[o]``).  A float32
classifier head (used for training) is the one float node.

Shapes exclude the batch dimension: an activation is ``(C, H, W)``, a pooled
vector ``(C,)``.  The importers (``importers/``) build it, :mod:`.relax_build`
turns it into a Relax IRModule, :mod:`.reference` runs it in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import ModelFormatError, ShapeError, UnsupportedOpError
from .quant import INT8_MAX, INT8_MIN

SUPPORTED_KERNELS = (1, 3, 5, 7)
DTYPE_BYTES = {"int8": 1, "uint8": 1, "int32": 4, "float32": 4, "int64": 8}  # every tensor dtype the graphs use
SUPPORTED_STRIDES = (1, 2)


@dataclass(frozen=True)
class QuantParams:
    scale: float
    zero_point: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str = "int8"
    quant: QuantParams | None = None


@dataclass
class Conv2D:
    """int8 conv with zero-point padding ``(k-1)//2``, then requantize+clamp.

    ``qmin``/``qmax`` fold a ReLU/ReLU6 into the int8 output range.
    """

    name: str
    input: str
    output: str
    weight: np.ndarray  # int8 (O, I/groups, k, k)
    bias: np.ndarray  # int32 (O,)
    weight_scales: np.ndarray  # float32 (O,)
    stride: int = 1
    groups: int = 1
    qmin: int = INT8_MIN
    qmax: int = INT8_MAX
    op = "conv2d"

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,)

    @property
    def kernel(self) -> int:
        return int(self.weight.shape[2])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def padding(self) -> int:
        return (self.kernel - 1) // 2

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclass
class Add:
    """Residual add of two int8 tensors, requantized to the output's params."""

    name: str
    lhs: str
    rhs: str
    output: str
    qmin: int = INT8_MIN
    qmax: int = INT8_MAX
    op = "add"

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.lhs, self.rhs)


@dataclass
class GlobalAvgPool:
    """Mean over H and W of an int8 (C, H, W) tensor -> int8 (C,)."""

    name: str
    input: str
    output: str
    op = "global_avg_pool"

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,)


@dataclass
class Linear:
    """Classifier on the pooled vector.

    int8 mode: weight int8 (O, I), bias int32, per-channel ``weight_scales``,
    int8 output.  float32 mode (``weight.dtype == float32``): the int8 input is
    dequantized and the output is float32 logits.
    """

    name: str
    input: str
    output: str
    weight: np.ndarray
    bias: np.ndarray
    weight_scales: np.ndarray | None = None
    qmin: int = INT8_MIN
    qmax: int = INT8_MAX
    op = "linear"

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,)

    @property
    def is_float(self) -> bool:
        return self.weight.dtype == np.float32

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1])


Node = Conv2D | Add | GlobalAvgPool | Linear


@dataclass
class Model:
    name: str
    input: str
    output: str
    tensors: dict[str, TensorInfo]
    nodes: list[Node] = field(default_factory=list)

    # ---- queries -------------------------------------------------------
    @property
    def input_info(self) -> TensorInfo:
        return self.tensors[self.input]

    @property
    def output_info(self) -> TensorInfo:
        return self.tensors[self.output]

    def convs(self) -> list[Conv2D]:
        """Convs in graph order; their position is the paper's "conv index"."""
        return [n for n in self.nodes if isinstance(n, Conv2D)]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def producer(self, tensor: str) -> Node | None:
        for n in self.nodes:
            if n.output == tensor:
                return n
        return None

    def node_macs(self, node: Node) -> int:
        out = self.tensors[node.output].shape
        if isinstance(node, Conv2D):
            return int(np.prod(out)) * (node.in_channels // node.groups) * node.kernel**2
        if isinstance(node, Linear):
            return node.out_channels * node.in_channels
        return 0

    def node_params(self, node: Node) -> int:
        if isinstance(node, (Conv2D, Linear)):
            return int(node.weight.size + node.bias.size)
        return 0

    def macs(self) -> int:
        return sum(self.node_macs(n) for n in self.nodes)

    def params(self) -> int:
        return sum(self.node_params(n) for n in self.nodes)

    # ---- validation ----------------------------------------------------
    def validate(self) -> Model:
        """Check shapes, dtypes and quantization of every node; raise naming the node."""
        known = {self.input}
        if self.input not in self.tensors:
            raise ModelFormatError(f"model input tensor {self.input!r} has no tensor info")
        for node in self.nodes:
            for t in node.inputs:
                if t not in known:
                    raise ModelFormatError(f"node {node.name!r}: input tensor {t!r} is not produced before it")
            if node.output not in self.tensors:
                raise ModelFormatError(f"node {node.name!r}: output tensor {node.output!r} has no tensor info")
            check_node(self.tensors, node)
            known.add(node.output)
        if self.output not in known:
            raise ModelFormatError(f"model output tensor {self.output!r} is never produced")
        return self


def with_input_size(model: Model, size: tuple[int, int]) -> Model:
    """The same network reading (H, W) = ``size`` images, every activation shape re-derived from the input.

    Convs, adds and the global pool do not depend on the resolution (the
    paper's ``in_shape`` fields are one 128x128 instance of the network), so
    a smaller input buys a quadratically cheaper training step at the same
    weights and quantization (arrays shared, not copied).
    """
    h, w = (int(d) for d in size)
    if h < 1 or w < 1:
        raise ShapeError(f"model {model.name!r}: input size must be positive, got {h}x{w}")
    shapes = {model.input: (model.input_info.shape[0], h, w)}
    for node in model.nodes:
        if isinstance(node, Conv2D):
            _, hh, ww = shapes[node.input]
            shapes[node.output] = (node.out_channels, *conv_out_hw(hh, ww, node.kernel, node.stride))
        elif isinstance(node, Add):
            shapes[node.output] = shapes[node.lhs]
        elif isinstance(node, GlobalAvgPool):
            shapes[node.output] = shapes[node.input][:1]
    tensors = {k: replace(v, shape=shapes.get(k, v.shape)) for k, v in model.tensors.items()}
    return Model(model.name, model.input, model.output, tensors, list(model.nodes)).validate()


def conv_out_hw(h: int, w: int, kernel: int, stride: int) -> tuple[int, int]:
    pad = (kernel - 1) // 2
    return (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1


def _require(cond: bool, node: Node, msg: str, exc=ModelFormatError) -> None:
    if not cond:
        raise exc(f"node {node.name!r} ({node.op}): {msg}")


def _check_array(node: Node, field_name: str, arr, dtype, shape) -> None:
    _require(isinstance(arr, np.ndarray), node, f"field {field_name!r} must be a numpy array, got {type(arr).__name__}")
    _require(arr.dtype == np.dtype(dtype), node, f"field {field_name!r} must be {dtype}, got {arr.dtype}")
    _require(tuple(arr.shape) == tuple(shape), node, f"field {field_name!r} must have shape {tuple(shape)}, got {tuple(arr.shape)}")


def _check_quant(tensors: dict[str, TensorInfo], node: Node, tensor: str) -> QuantParams:
    info = tensors[tensor]
    q = info.quant
    _require(info.dtype == "int8" and q is not None, node, f"tensor {tensor!r} must be int8 with quantization params")
    _require(np.isfinite(q.scale) and q.scale > 0, node, f"tensor {tensor!r} has invalid scale {q.scale!r}")
    _require(INT8_MIN <= q.zero_point <= INT8_MAX, node, f"tensor {tensor!r} zero point {q.zero_point} outside int8")
    return q


def check_node(tensors: dict[str, TensorInfo], node: Node) -> None:
    """Validate one node against the tensor infos of its operands; raise naming the node."""
    for t in (*node.inputs, node.output):
        if not (isinstance(node, Linear) and node.is_float and t == node.output):
            _check_quant(tensors, node, t)
    if hasattr(node, "qmin"):
        _require(INT8_MIN <= node.qmin <= node.qmax <= INT8_MAX, node, f"clamp range [{node.qmin}, {node.qmax}] is not inside int8")
    ins = [tensors[t].shape for t in node.inputs]
    out = tensors[node.output].shape
    if isinstance(node, Conv2D):
        w = node.weight
        _require(isinstance(w, np.ndarray) and w.ndim == 4, node, "field 'weight' must be a 4-D array (O, I/groups, k, k)")
        k = node.kernel
        _require(w.shape[2] == w.shape[3], node, f"only square kernels are supported, got {w.shape[2]}x{w.shape[3]}", UnsupportedOpError)
        _require(k in SUPPORTED_KERNELS, node, f"kernel size {k} not supported (supported: {SUPPORTED_KERNELS})", UnsupportedOpError)
        _require(node.stride in SUPPORTED_STRIDES, node, f"stride {node.stride} not supported (supported: {SUPPORTED_STRIDES})", UnsupportedOpError)
        _require(len(ins[0]) == 3, node, f"input must be (C, H, W), got {ins[0]}", ShapeError)
        c, h, wd = ins[0]
        _require(node.groups >= 1 and c % node.groups == 0 and node.out_channels % node.groups == 0, node,
                 f"groups={node.groups} does not divide channels {c} -> {node.out_channels}")
        _require(node.groups == 1 or node.depthwise, node, f"grouped conv with groups={node.groups} (not depthwise) is not supported", UnsupportedOpError)
        _check_array(node, "weight", w, "int8", (node.out_channels, c // node.groups, k, k))
        _check_array(node, "bias", node.bias, "int32", (node.out_channels,))
        _check_array(node, "weight_scales", node.weight_scales, "float32", (node.out_channels,))
        _require(bool(np.all(np.isfinite(node.weight_scales)) and np.all(node.weight_scales > 0)), node, "field 'weight_scales' must be finite and > 0")
        expect = (node.out_channels, *conv_out_hw(h, wd, k, node.stride))
        _require(tuple(out) == expect, node, f"output shape {tuple(out)} does not match {expect}", ShapeError)
    elif isinstance(node, Add):
        _require(ins[0] == ins[1] == out, node, f"operand shapes {ins[0]}, {ins[1]} and output {out} must be equal", ShapeError)
    elif isinstance(node, GlobalAvgPool):
        _require(len(ins[0]) == 3 and tuple(out) == (ins[0][0],), node, f"pool of {ins[0]} must give ({ins[0][0]},), got {out}", ShapeError)
    elif isinstance(node, Linear):
        w = node.weight
        _require(isinstance(w, np.ndarray) and w.ndim == 2, node, "field 'weight' must be a 2-D array (O, I)")
        _require(tuple(ins[0]) == (node.in_channels,), node, f"input must be ({node.in_channels},), got {ins[0]}", ShapeError)
        _require(tuple(out) == (node.out_channels,), node, f"output must be ({node.out_channels},), got {out}", ShapeError)
        if node.is_float:
            _check_array(node, "bias", node.bias, "float32", (node.out_channels,))
            _require(tensors[node.output].dtype == "float32", node, "float classifier output must be float32")
        else:
            _check_array(node, "weight", w, "int8", w.shape)
            _check_array(node, "bias", node.bias, "int32", (node.out_channels,))
            _check_array(node, "weight_scales", node.weight_scales, "float32", (node.out_channels,))
