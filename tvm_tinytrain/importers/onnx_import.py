"""Importer of ONNX CNNs into a validated :class:`~tvm_tinytrain.model.Model`.

Two kinds of model are accepted:

* **QDQ int8** (QuantizeLinear/DequantizeLinear around float ops, as written
  by onnxruntime's static quantizer and by :func:`.onnx_export.export_onnx`).
  Each QuantizeLinear fixes the int8 params of the float tensor it quantizes,
  and that tensor becomes a Model tensor of the same name (the graph input
  keeps its name).  uint8 activations are converted to int8 (``q - 128``,
  zero point ``- 128``), which represents the same real values.  Weights are
  the DequantizeLinear of a symmetric int8 initializer (per-tensor or
  per-output-channel), or of a QuantizeLinear of a float one as QAT exports
  write them; biases an int32 DequantizeLinear at ``x_scale * w_scale`` or a
  float initializer, quantized to that scale (rounding, saturating).
* **fp32**, quantized post-training by :func:`quantize_fp32` with a
  calibration batch into a QDQ model that is then read as above.

Operators: Conv (groups 1 or depthwise, square kernels 1/3/5/7, strides 1/2,
dilation 1, padding ``(k-1)//2`` on every side), Relu and Clip (folded into
the producing node's int8 clamp), Add (residual; or the bias of a MatMul),
GlobalAveragePool, Flatten/Reshape of the pooled tensor, Gemm/MatMul (the
classifier), Constant.  A classifier whose output is not quantized becomes
the float32 ``Linear`` head.  Anything else raises
:class:`~tvm_tinytrain.errors.UnsupportedOpError` naming the node and op.

Scales are float32 in ONNX; :func:`.onnx_export.export_onnx` also stores the
Model's exact Python-float scales in the metadata entry
:data:`SCALES_METADATA_KEY`, which this importer prefers whenever it agrees
with the graph's float32 scale, so an export/import round trip is lossless.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelFormatError, ShapeError, TinyTrainError, UnsupportedOpError
from ..model import SUPPORTED_KERNELS, SUPPORTED_STRIDES, Add, Conv2D, GlobalAvgPool, Linear, Model, QuantParams, TensorInfo, conv_out_hw
from ..quant import INT8_MAX, INT8_MIN, INT32_MAX, INT32_MIN

SCALES_METADATA_KEY = "tvm_tinytrain.scales"
QDQ_OPSET = 19  # the opset of the QDQ graphs written here (onnx.reference runs QDQ from 19 on)
FP32_OPS = ("Conv", "Relu", "Clip", "Add", "GlobalAveragePool", "Flatten", "Reshape", "Gemm", "MatMul", "Constant")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
SUPPORTED_OPS = FP32_OPS + _QDQ_OPS
_ZERO_SPAN_RANGE = 1.0  # range given to an all-zero calibrated tensor: any scale represents it exactly
_ZERO_CHANNEL_SCALE = 2.0**-40  # weight scale of an all-zero channel without bias: its rescale rounds to 0


# ---- public API ----------------------------------------------------------------


def load_onnx(source, calibration: np.ndarray | None = None, name: str | None = None) -> Model:
    """Import an ONNX file or ``ModelProto`` as a validated int8 :class:`Model`.

    ``calibration`` (float ``(N, C, H, W)``) is required for an fp32 model,
    which is then quantized by :func:`quantize_fp32`; a QDQ model carries its
    own quantization and only has the batch's shape checked.  ``name``
    defaults to the graph name, then the file name.  Errors raised for a
    file start with its path.
    """
    proto, label = _read(source)
    with _prefixed(label):
        proto = _prepared(proto)
        if not _is_qdq(proto):
            if calibration is None:
                raise ModelFormatError("fp32 model (no QuantizeLinear/DequantizeLinear): calibration data is required to quantize it")
            proto = _quantize_fp32(proto, calibration)
        elif calibration is not None:  # unused, but a batch of the wrong shape is still the caller's mistake
            _calibration_batch(calibration, *_graph_input(proto.graph))
        default = proto.graph.name or (Path(label).stem if label else "onnx_model")
        return _QdqImporter(proto).model(name or default)


def quantize_fp32(source, calibration: np.ndarray) -> onnx.ModelProto:
    """Post-training static quantization of an fp32 CNN into a QDQ int8 ``ModelProto``.

    The float graph is run on the calibration batch (float ``(N, C, H, W)``)
    to find every tensor's range.  The graph input and the result of every
    Conv/Add/GlobalAveragePool/Gemm/MatMul (after its Relu/Clip, if any) get
    per-tensor asymmetric int8 params covering ``[min(lo, 0), max(hi, 0)]``:
    ``scale = (hi - lo) / 255``, ``zero = round(-128 - lo / scale)``.
    Weights become symmetric per-output-channel int8 (``max|w| / 127``, raised
    where needed so the int32 bias cannot saturate) and biases int32 with scale
    ``x_scale * w_scale``.  The graph output is renamed to the dequantized
    tensor.  Nodes are given unique names where they had none.
    """
    proto, label = _read(source)
    with _prefixed(label):
        proto = _prepared(proto)
        if _is_qdq(proto):
            raise ModelFormatError("model is already quantized (it has QuantizeLinear/DequantizeLinear nodes)")
        return _quantize_fp32(proto, calibration)


# ---- reading and shared checks --------------------------------------------------


def _read(source) -> tuple[onnx.ModelProto, str | None]:
    """The ModelProto and, for a file, its path (used to label every error)."""
    if isinstance(source, onnx.ModelProto):
        return source, None
    path = str(source)
    try:
        return onnx.load(path), path
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found") from None
    except Exception as err:  # protobuf decode errors and the like
        raise ModelFormatError(f"{path}: not a readable ONNX model: {type(err).__name__}: {err}") from None


@contextlib.contextmanager
def _prefixed(label: str | None):
    """Start every TinyTrainError raised inside with the file's path."""
    try:
        yield
    except TinyTrainError as err:
        if label is None:
            raise
        raise type(err)(f"{label}: {err}") from None


def _prepared(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A checked copy whose nodes all have unique names (they become Model node names).

    Unsupported operators are reported before onnx's checker runs, so that
    one the checker does not know is still named as such.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        base = node.name or f"{node.op_type.lower()}_{i}"
        unique, k = base, 1
        while unique in seen:
            k += 1
            unique = f"{base}_{k}"
        node.name = unique
        seen.add(unique)
    for node in out.graph.node:
        if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"{_where(node)}: operator not supported")
    try:
        onnx.checker.check_model(out)
    except Exception as err:  # onnx.checker.ValidationError and protobuf errors
        raise ModelFormatError(f"invalid ONNX model: {err}") from None
    return out


def _is_qdq(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in _QDQ_OPS for n in proto.graph.node)


def _graph_input(graph: onnx.GraphProto) -> tuple[str, tuple[int, int, int]]:
    """Name and ``(C, H, W)`` of the single float NCHW graph input (batch may be symbolic)."""
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelFormatError(f"the graph must have exactly one input, found {[i.name for i in inputs]}")
    x = inputs[0]
    t = x.type.tensor_type
    if t.elem_type != onnx.TensorProto.FLOAT:
        raise ModelFormatError(f"graph input {x.name!r} must be float32, got {onnx.TensorProto.DataType.Name(t.elem_type)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if len(dims) != 4 or any(d is None or d <= 0 for d in dims[1:]):
        shown = tuple(d if d is not None else "?" for d in dims)
        raise ShapeError(f"graph input {x.name!r} must be (N, C, H, W) with fixed C, H, W, got {shown}")
    return x.name, tuple(dims[1:])


def _graph_output(graph: onnx.GraphProto) -> str:
    if len(graph.output) != 1:
        raise ModelFormatError(f"the graph must have exactly one output, found {[o.name for o in graph.output]}")
    return graph.output[0].name


def _calibration_batch(calibration, input_name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The calibration batch as float64, checked against the graph input's ``(C, H, W)``."""
    arr = np.asarray(calibration)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != shape or arr.shape[0] == 0:
        raise ShapeError(f"calibration data for input {input_name!r} must have shape (N, {', '.join(map(str, shape))}) "
                         f"with N >= 1, got {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ShapeError(f"calibration data for input {input_name!r} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ShapeError(f"calibration data for input {input_name!r} contains NaN or inf")
    return arr


def _where(node: onnx.NodeProto) -> str:
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    return f"node {node.name!r} (op {op!r})"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv_geometry(node: onnx.NodeProto, w_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(stride, groups)`` of a Conv, after checking it is one the Model can express."""
    if len(w_shape) != 4 or len(in_shape) != 3:
        raise UnsupportedOpError(f"{_where(node)}: only 2-D convolutions are supported (weight shape {tuple(w_shape)})")
    a = _attrs(node)
    kh, kw = w_shape[2:]
    if list(a.get("kernel_shape", [kh, kw])) != [kh, kw]:
        raise ModelFormatError(f"{_where(node)}: kernel_shape {a['kernel_shape']} disagrees with weight shape {tuple(w_shape)}")
    if kh != kw or kh not in SUPPORTED_KERNELS:
        raise UnsupportedOpError(f"{_where(node)}: kernel {kh}x{kw} not supported (square kernels {SUPPORTED_KERNELS} only)")
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        raise UnsupportedOpError(f"{_where(node)}: dilations {list(a['dilations'])} not supported (only 1)")
    strides = list(a.get("strides", [1, 1]))
    if len(set(strides)) != 1 or strides[0] not in SUPPORTED_STRIDES:
        raise UnsupportedOpError(f"{_where(node)}: strides {strides} not supported (equal strides in {SUPPORTED_STRIDES} only)")
    pads = _conv_pads(node, a, kh, strides[0], in_shape[1:])
    if any(p != (kh - 1) // 2 for p in pads):
        raise UnsupportedOpError(f"{_where(node)}: pads {pads} not supported (only symmetric (k-1)//2 = {(kh - 1) // 2})")
    groups, c_in, c_out = int(a.get("group", 1)), in_shape[0], w_shape[0]
    if w_shape[1] * groups != c_in:
        raise ShapeError(f"{_where(node)}: weight {tuple(w_shape)} with group={groups} does not fit {c_in} input channels")
    if groups != 1 and not groups == c_in == c_out:
        raise UnsupportedOpError(f"{_where(node)}: group={groups} not supported (only 1 or depthwise)")
    return strides[0], groups


def _conv_pads(node: onnx.NodeProto, attrs: dict, k: int, stride: int, hw: tuple[int, ...]) -> list[int]:
    """Explicit ``[top, left, bottom, right]`` pads, resolving ``auto_pad`` as ONNX does."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "NOTSET":
        return list(attrs.get("pads", [0, 0, 0, 0]))
    if auto == "VALID":
        return [0, 0, 0, 0]
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise ModelFormatError(f"{_where(node)}: unknown auto_pad {auto!r}")
    begin, end = [], []
    for size in hw:
        total = max((-(-size // stride) - 1) * stride + k - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


def _gemm_trans_b(node: onnx.NodeProto) -> bool:
    """Gemm is a plain ``A @ op(B) + C``: alpha = beta = 1, A not transposed."""
    a = _attrs(node)
    if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
        raise UnsupportedOpError(f"{_where(node)}: only alpha=1, beta=1, transA=0 are supported")
    return bool(a.get("transB", 0))


def _flattened(node: onnx.NodeProto, shape: tuple[int, ...], target: np.ndarray | None) -> tuple[int]:
    """Shape ``(C,)`` of a Flatten/Reshape of a pooled ``(N, C, 1, 1)`` tensor to ``(N, C)``, the one reshape a CNN head needs."""
    bad = UnsupportedOpError(f"{_where(node)}: only flattening a pooled (N, C, 1, 1) tensor to (N, C) is supported, "
                             f"input is (N, {', '.join(map(str, shape))})")
    if not shape or math.prod(shape[1:]) != 1:
        raise bad
    c = shape[0]
    if node.op_type == "Flatten":
        if _attrs(node).get("axis", 1) % (len(shape) + 1) != 1:
            raise bad
        return (c,)
    t = [int(v) for v in np.asarray(target).ravel()] if target is not None else []
    if len(t) != 2 or t[0] not in (0, 1, -1) or t[1] not in (c, -1) or t == [-1, -1]:
        raise UnsupportedOpError(f"{_where(node)}: reshape to {t} not supported (only (N, C) from a pooled (N, C, 1, 1) tensor)")
    return (c,)


def _clip_bounds(node: onnx.NodeProto, lo: np.ndarray | None, hi: np.ndarray | None) -> tuple[float, float]:
    """Float bounds of Relu/Clip (Clip's min/max inputs, or its opset-6 attributes)."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    a = _attrs(node)
    lo_v = float(np.asarray(lo).ravel()[0]) if lo is not None else a.get("min", -math.inf)
    hi_v = float(np.asarray(hi).ravel()[0]) if hi is not None else a.get("max", math.inf)
    return lo_v, hi_v


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    a = _attrs(node)
    if "value" not in a:
        raise UnsupportedOpError(f"{_where(node)}: only the 'value' attribute of Constant is supported")
    return numpy_helper.to_array(a["value"])


def _vector(arr: np.ndarray, n: int, what: str) -> np.ndarray:
    """``arr`` as ``(n,)``, broadcasting a single value."""
    v = np.asarray(arr).ravel()
    if v.size == 1:
        return np.full(n, v[0], dtype=v.dtype)
    if v.size != n:
        raise ShapeError(f"{what}: {v.size} values for {n} channels")
    return v


# ---- the QDQ importer -------------------------------------------------------------


@dataclass(frozen=True)
class _Const:
    """An initializer or Constant; ``scale``/``zero``/``axis`` once it went through DequantizeLinear."""

    data: np.ndarray
    scale: np.ndarray | None = None
    zero: np.ndarray | None = None
    axis: int = 0

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def along_axis(self, param: np.ndarray) -> np.ndarray:
        """A per-tensor or per-axis scale/zero shaped to broadcast against ``data``."""
        if param.size == 1:
            return param.reshape(())
        shape = [1] * self.data.ndim
        shape[self.axis] = -1
        return param.reshape(shape)

    def real(self) -> np.ndarray:
        if not self.quantized:
            return self.data.astype(np.float64)
        z, s = self.along_axis(self.zero).astype(np.float64), self.along_axis(self.scale).astype(np.float64)
        return (self.data.astype(np.float64) - z) * s


@dataclass(frozen=True)
class _GraphInput:
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Act:
    """A Model int8 tensor as ONNX sees it: the QuantizeLinear output, or its DequantizeLinear (``dequantized``)."""

    tensor: str
    shape: tuple[int, ...]  # ONNX shape without batch: (C, 1, 1) before a Flatten, (C,) after
    dequantized: bool
    storage: type = np.int8  # ONNX element type (uint8 tensors are stored shifted by -128 in the Model)


@dataclass
class _Pending:
    """Float result of a compute op awaiting its QuantizeLinear; Relu/Clip narrow ``lo``/``hi``."""

    node: Conv2D | Add | GlobalAvgPool | Linear
    shape: tuple[int, ...]
    lo: float = -math.inf
    hi: float = math.inf
    has_bias: bool = True


def _int8_storage(data: np.ndarray, zero: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and int zero points of int8/uint8 data; uint8 is shifted by -128 (same real values)."""
    if data.dtype == np.uint8:
        return (data.astype(np.int16) - 128).astype(np.int8), zero.astype(np.int64) - 128
    if data.dtype == np.int8:
        return data, zero.astype(np.int64)
    raise UnsupportedOpError(f"{what}: element type {data.dtype} not supported (int8 or uint8 only)")


class _QdqImporter:
    """Walks a QDQ graph in order, turning compute ops into Model nodes once their output is quantized."""

    HANDLERS = {
        "QuantizeLinear": "_quantize", "DequantizeLinear": "_dequantize", "Conv": "_conv",
        "Relu": "_clamp", "Clip": "_clamp", "Add": "_add", "GlobalAveragePool": "_pool",
        "Flatten": "_flatten", "Reshape": "_flatten", "Gemm": "_gemm", "MatMul": "_gemm", "Constant": "_constant",
    }

    def __init__(self, proto: onnx.ModelProto):
        g = proto.graph
        self.input, self.input_shape = _graph_input(g)
        self.output = _graph_output(g)
        self.values: dict[str, object] = {i.name: _Const(numpy_helper.to_array(i)) for i in g.initializer}
        self.values[self.input] = _GraphInput(self.input, self.input_shape)
        self.uses: dict[str, int] = {self.output: 1}
        for node in g.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.exact_scales = _exact_scales(proto)
        self.graph = g
        self.tensors: dict[str, TensorInfo] = {}
        self.nodes: list = []

    def model(self, name: str) -> Model:
        for node in self.graph.node:
            value = getattr(self, self.HANDLERS[node.op_type])(node)
            if isinstance(value, _Pending) and self.uses.get(node.output[0], 0) != 1:
                raise UnsupportedOpError(f"{_where(node)}: its float output {node.output[0]!r} must feed exactly one "
                                         f"QuantizeLinear (optionally through Relu/Clip), it feeds {self.uses.get(node.output[0], 0)} nodes")
            self.values[node.output[0]] = value
        if self.input not in self.tensors:
            raise ModelFormatError(f"graph input {self.input!r} is never quantized by a QuantizeLinear")
        return Model(name, self.input, self._model_output(), self.tensors, self.nodes).validate()

    def _model_output(self) -> str:
        v = self.values.get(self.output)
        if isinstance(v, _Act):
            return v.tensor
        if isinstance(v, _Pending) and isinstance(v.node, Linear):
            return self._float_head(v, self.output)
        raise ModelFormatError(f"graph output {self.output!r} must be a quantized tensor or the output of a Gemm/MatMul classifier")

    # ---- input access -----------------------------------------------------------------
    def _arg(self, node: onnx.NodeProto, i: int):
        if i >= len(node.input) or not node.input[i]:
            return None
        if node.input[i] not in self.values:
            raise ModelFormatError(f"{_where(node)}: input {node.input[i]!r} is not produced before it")
        return self.values[node.input[i]]

    def _const(self, node: onnx.NodeProto, i: int, what: str, optional: bool = False) -> _Const | None:
        v = self._arg(node, i)
        if v is None and optional:
            return None
        if not isinstance(v, _Const):
            name = node.input[i] if i < len(node.input) else ""
            raise UnsupportedOpError(f"{_where(node)}: {what} {name!r} must be a constant initializer")
        return v

    def _act(self, node: onnx.NodeProto, i: int) -> _Act:
        """A float activation operand, which must be the DequantizeLinear of a Model tensor."""
        v = self._arg(node, i)
        if isinstance(v, _Act) and v.dequantized:
            return v
        name = node.input[i]
        if isinstance(v, _GraphInput):
            raise UnsupportedOpError(f"{_where(node)}: input {name!r} is the float graph input; quantize it with QuantizeLinear first")
        if isinstance(v, _Pending):
            raise UnsupportedOpError(f"{_where(node)}: input {name!r} is a float result that is not quantized (QuantizeLinear/DequantizeLinear expected)")
        if isinstance(v, _Act):
            raise UnsupportedOpError(f"{_where(node)}: input {name!r} is int8; a DequantizeLinear output is expected")
        raise ModelFormatError(f"{_where(node)}: input {name!r} must be an activation, not a constant")

    # ---- quantize / dequantize -----------------------------------------------------
    def _qparams(self, node: onnx.NodeProto, default_storage) -> tuple[float, int, type]:
        """Per-tensor ``(float32 scale, int8 zero, storage type)`` of an activation Q/DQ."""
        scale = self._const(node, 1, "scale").data
        zc = self._const(node, 2, "zero point", optional=True)
        zero = zc.data if zc is not None else np.zeros((), default_storage)
        if scale.size != 1 or zero.size != 1:
            raise UnsupportedOpError(f"{_where(node)}: per-channel quantization of activations is not supported")
        _, z = _int8_storage(zero, zero, f"{_where(node)}: zero point")
        s = float(np.float32(scale.ravel()[0]))
        if not (math.isfinite(s) and s > 0):
            raise ModelFormatError(f"{_where(node)}: scale {s!r} must be finite and > 0")
        return s, int(z.ravel()[0]), zero.dtype.type

    def _quantize(self, node: onnx.NodeProto) -> _Act | _Const:
        a = _attrs(node)
        if a.get("block_size", 0):
            raise UnsupportedOpError(f"{_where(node)}: blocked quantization is not supported")
        default = np.int8 if a.get("output_dtype") == onnx.TensorProto.INT8 else np.uint8
        x, name = self._arg(node, 0), node.input[0]
        if isinstance(x, _Const) and not x.quantized:
            return self._quantized_const(node, x, default)
        scale, zero, storage = self._qparams(node, default)
        if isinstance(x, _Act) and x.dequantized:  # a re-quantization of a Model tensor: only a no-op is allowed
            self._same_params(node, x.tensor, scale, zero)
            return replace(x, dequantized=False, storage=storage)
        qp = QuantParams(self._exact(name, scale), zero)
        if isinstance(x, _GraphInput):
            if name in self.tensors:
                self._same_params(node, name, scale, zero)
            self.tensors[name] = TensorInfo(name, x.shape, "int8", qp)
            return _Act(name, x.shape, False, storage)
        if isinstance(x, _Pending):
            return self._emit(node, x, name, qp, storage)
        raise ModelFormatError(f"{_where(node)}: input {name!r} must be a float activation")

    def _dequantize(self, node: onnx.NodeProto) -> _Const | _Act:
        x = self._arg(node, 0)
        if isinstance(x, _Const) and not x.quantized:
            return self._const_params(node, x, x.data.dtype)
        if isinstance(x, _Act) and not x.dequantized:
            scale, zero, _ = self._qparams(node, x.storage)
            self._same_params(node, x.tensor, scale, zero)
            return replace(x, dequantized=True)
        raise ModelFormatError(f"{_where(node)}: input {node.input[0]!r} must be a QuantizeLinear output or an initializer")

    def _quantized_const(self, node: onnx.NodeProto, x: _Const, default_dtype) -> _Const:
        """A float weight quantized by the graph itself (as QAT exports do), quantized here as ONNX does:
        float32 division, halves to even, saturation."""
        p = self._const_params(node, _Const(x.data.astype(np.float32)), default_dtype)
        if not np.issubdtype(p.zero.dtype, np.integer):
            raise UnsupportedOpError(f"{_where(node)}: quantization to {p.zero.dtype} is not supported")
        info = np.iinfo(p.zero.dtype)
        q = np.round(p.data / p.along_axis(p.scale)) + p.along_axis(p.zero).astype(np.float32)
        return _Const(np.clip(q, info.min, info.max).astype(p.zero.dtype))

    def _const_params(self, node: onnx.NodeProto, x: _Const, default_dtype) -> _Const:
        """``x`` with the scale, zero point and axis of the Q/DQ ``node`` applied to it."""
        scale = self._const(node, 1, "scale").data.astype(np.float32)
        zc = self._const(node, 2, "zero point", optional=True)
        zero = zc.data if zc is not None else np.zeros(scale.shape, default_dtype)
        axis = int(_attrs(node).get("axis", 1))
        if scale.size > 1:
            if not -x.data.ndim <= axis < x.data.ndim or x.data.shape[axis] != scale.size or zero.size not in (1, scale.size):
                raise ModelFormatError(f"{_where(node)}: {scale.size} scales do not fit axis {axis} of shape {x.data.shape}")
            axis %= x.data.ndim
        return _Const(x.data, scale, zero, axis)

    def _same_params(self, node: onnx.NodeProto, tensor: str, scale: float, zero: int) -> None:
        q = self.tensors[tensor].quant
        if np.float32(q.scale) != np.float32(scale) or q.zero_point != zero:
            raise UnsupportedOpError(f"{_where(node)}: re-quantizes tensor {tensor!r} (scale {q.scale:g}, zero {q.zero_point}) "
                                     f"to scale {scale:g}, zero {zero} without a compute op")

    def _exact(self, tensor: str, scale32: float) -> float:
        """The exporter's exact Python-float scale of ``tensor``, when it matches the graph's float32 scale."""
        exact = self.exact_scales.get(tensor)
        return exact if exact is not None and np.float32(exact) == np.float32(scale32) else scale32

    def _emit(self, qnode: onnx.NodeProto, p: _Pending, tensor: str, qp: QuantParams, storage) -> _Act:
        """The QuantizeLinear that ends a pending compute op: the op becomes a Model node with output ``tensor``."""
        node = p.node
        if isinstance(node, Linear) and node.is_float:
            raise ModelFormatError(f"{_where(qnode)}: the classifier {node.name!r} has float weights but a quantized output; "
                                   "its weight must come from DequantizeLinear")
        node.output = tensor
        if hasattr(node, "qmin"):
            node.qmin, node.qmax = _clamp_range(qnode, p.lo, p.hi, qp)
        model_shape = (p.shape[0],) if isinstance(node, GlobalAvgPool) else p.shape
        self.tensors[tensor] = TensorInfo(tensor, model_shape, "int8", qp)
        self.nodes.append(node)
        return _Act(tensor, p.shape, False, storage)

    # ---- compute ops -------------------------------------------------------------------
    def _weight(self, node: onnx.NodeProto, i: int, out_axis: int) -> tuple[np.ndarray, np.ndarray]:
        """int8 weight with output channels first, and its float32 per-channel scales."""
        c = self._const(node, i, "weight")
        if not c.quantized:
            raise ModelFormatError(f"{_where(node)}: weight {node.input[i]!r} must be the DequantizeLinear of an int8 initializer")
        data, zero = _int8_storage(c.data, c.zero, f"{_where(node)}: weight {node.input[i]!r}")
        if np.any(zero != 0):
            raise UnsupportedOpError(f"{_where(node)}: weight {node.input[i]!r} must be symmetric (zero point 0)")
        if c.scale.size > 1 and c.axis != out_axis % data.ndim:
            raise UnsupportedOpError(f"{_where(node)}: weight {node.input[i]!r} is quantized along axis {c.axis}, "
                                     f"per-channel scales must be along the output-channel axis {out_axis % data.ndim}")
        w = np.ascontiguousarray(np.moveaxis(data, out_axis, 0))
        scales = _vector(c.scale, w.shape[0], f"{_where(node)}: weight scale").astype(np.float32)
        if not np.all(np.isfinite(scales) & (scales > 0)):
            raise ModelFormatError(f"{_where(node)}: weight scales of {node.input[i]!r} must be finite and > 0")
        return w, scales

    def _int_bias(self, node: onnx.NodeProto, c: _Const | None, x_scale: float, w_scales: np.ndarray) -> np.ndarray:
        """int32 bias at scale ``x_scale * w_scale``: taken as is when stored at that scale, else re-quantized (saturating)."""
        n = len(w_scales)
        if c is None:
            return np.zeros(n, np.int32)
        want = np.float64(x_scale) * w_scales.astype(np.float64)
        what = f"{_where(node)}: bias"
        if c.quantized and c.data.dtype == np.int32 and not np.any(c.zero):
            if np.allclose(_vector(c.scale, n, what), want, rtol=1e-5, atol=0):
                return _vector(c.data, n, what).astype(np.int32)
        return np.clip(np.round(_vector(c.real(), n, what) / want), INT32_MIN, INT32_MAX).astype(np.int32)

    def _conv(self, node: onnx.NodeProto) -> _Pending:
        x = self._act(node, 0)
        w, scales = self._weight(node, 1, 0)
        stride, groups = _conv_geometry(node, w.shape, x.shape)
        bias = self._int_bias(node, self._const(node, 2, "bias", optional=True), self.tensors[x.tensor].quant.scale, scales)
        conv = Conv2D(node.name, x.tensor, "", w, bias, scales, stride, groups)
        return _Pending(conv, (conv.out_channels, *conv_out_hw(*x.shape[1:], conv.kernel, stride)))

    def _gemm(self, node: onnx.NodeProto) -> _Pending:
        """Gemm/MatMul classifier on a flattened pooled tensor: int8 with a DequantizeLinear weight, else float."""
        x = self._act(node, 0)
        if len(x.shape) != 1:
            raise UnsupportedOpError(f"{_where(node)}: input must be a flattened (N, C) tensor, got (N, {', '.join(map(str, x.shape))})")
        trans_b = _gemm_trans_b(node) if node.op_type == "Gemm" else False
        out_axis = 0 if trans_b else 1
        b = self._const(node, 1, "weight")
        if b.data.ndim != 2 or b.data.shape[1 - out_axis] != x.shape[0]:
            raise ShapeError(f"{_where(node)}: weight shape {b.data.shape} does not fit input (N, {x.shape[0]})")
        if b.quantized:
            w, scales = self._weight(node, 1, out_axis)
            lin = Linear(node.name, x.tensor, "", w, np.zeros(len(w), np.int32), scales)
        else:
            w = np.ascontiguousarray(b.data.T if out_axis else b.data).astype(np.float32)
            lin = Linear(node.name, x.tensor, "", w, np.zeros(len(w), np.float32))
        p = _Pending(lin, (lin.out_channels,), has_bias=False)
        if node.op_type == "Gemm":
            self._set_bias(node, p, self._const(node, 2, "bias", optional=True))
        return p

    def _set_bias(self, node: onnx.NodeProto, p: _Pending, c: _Const | None) -> None:
        lin = p.node
        if lin.is_float:
            if c is not None:
                lin.bias = _vector(c.real(), lin.out_channels, f"{_where(node)}: bias").astype(np.float32)
        else:
            lin.bias = self._int_bias(node, c, self.tensors[lin.input].quant.scale, lin.weight_scales)
        p.has_bias = True

    def _add(self, node: onnx.NodeProto) -> _Pending:
        """A residual Add of two Model tensors, or the bias Add after a MatMul."""
        a, b = self._arg(node, 0), self._arg(node, 1)
        for lin, c in ((a, b), (b, a)):
            if isinstance(lin, _Pending) and isinstance(lin.node, Linear) and not lin.has_bias and isinstance(c, _Const):
                self._set_bias(node, lin, c)
                return lin
        a, b = self._act(node, 0), self._act(node, 1)
        if a.shape != b.shape or len(a.shape) != 3:
            raise UnsupportedOpError(f"{_where(node)}: only same-shape (N, C, H, W) operands are supported, got "
                                     f"{a.shape} and {b.shape}")
        return _Pending(Add(node.name, a.tensor, b.tensor, ""), a.shape)

    def _pool(self, node: onnx.NodeProto) -> _Pending:
        x = self._act(node, 0)
        if len(x.shape) != 3:
            raise UnsupportedOpError(f"{_where(node)}: input must be (N, C, H, W), got (N, {', '.join(map(str, x.shape))})")
        return _Pending(GlobalAvgPool(node.name, x.tensor, ""), (x.shape[0], 1, 1))

    def _flatten(self, node: onnx.NodeProto) -> _Act | _Pending:
        x = self._arg(node, 0)
        target = self._const(node, 1, "shape").data if node.op_type == "Reshape" else None
        if isinstance(x, _Act) or (isinstance(x, _Pending) and isinstance(x.node, GlobalAvgPool)):
            return replace(x, shape=_flattened(node, x.shape, target))
        raise UnsupportedOpError(f"{_where(node)}: only the pooled tensor may be flattened")

    def _clamp(self, node: onnx.NodeProto) -> _Pending:
        """Relu/Clip between a compute op and its QuantizeLinear: narrows the node's int8 clamp."""
        x = self._arg(node, 0)
        if not isinstance(x, _Pending) or isinstance(x.node, GlobalAvgPool):
            raise UnsupportedOpError(f"{_where(node)}: must directly follow a Conv, Add or Gemm (before its QuantizeLinear)")
        bounds = [self._const(node, i, "bound", optional=True) for i in (1, 2)]
        lo, hi = _clip_bounds(node, *(c.real() if c is not None else None for c in bounds))
        return replace(x, lo=max(x.lo, lo), hi=min(x.hi, hi))

    def _constant(self, node: onnx.NodeProto) -> _Const:
        return _Const(_constant_value(node))

    def _float_head(self, p: _Pending, tensor: str) -> str:
        """A classifier whose output stays float becomes the float32 Linear head (dequantized weights)."""
        lin = p.node
        if not lin.is_float:
            ws = lin.weight_scales.astype(np.float64)
            x_scale = self.tensors[lin.input].quant.scale
            lin.weight = (lin.weight.astype(np.float64) * ws[:, None]).astype(np.float32)
            lin.bias = (lin.bias.astype(np.float64) * x_scale * ws).astype(np.float32)
            lin.weight_scales = None
        lin.output = tensor
        self.tensors[tensor] = TensorInfo(tensor, p.shape, "float32")
        self.nodes.append(lin)
        return tensor


def _clamp_range(qnode: onnx.NodeProto, lo: float, hi: float, qp: QuantParams) -> tuple[int, int]:
    """int8 ``(qmin, qmax)`` of float clamp bounds: rounding is monotonic, so quantizing the bounds is exact."""

    def q(v: float) -> int:
        if math.isinf(v):
            return INT8_MIN if v < 0 else INT8_MAX
        return int(np.clip(np.round(v / qp.scale) + qp.zero_point, INT8_MIN, INT8_MAX))

    qmin, qmax = q(lo), q(hi)
    if qmin > qmax:
        raise ModelFormatError(f"{_where(qnode)}: clamp bounds [{lo:g}, {hi:g}] give an empty int8 range [{qmin}, {qmax}]")
    return qmin, qmax


def _exact_scales(proto: onnx.ModelProto) -> dict[str, float]:
    for prop in proto.metadata_props:
        if prop.key == SCALES_METADATA_KEY:
            try:
                table = json.loads(prop.value)
            except ValueError as err:
                raise ModelFormatError(f"metadata {SCALES_METADATA_KEY!r} is not valid JSON: {err}") from None
            if not isinstance(table, dict) or not all(isinstance(v, float) for v in table.values()):
                raise ModelFormatError(f"metadata {SCALES_METADATA_KEY!r} must map tensor names to floats")
            return table
    return {}


# ---- post-training quantization of fp32 models ---------------------------------------


def _quantize_fp32(proto: onnx.ModelProto, calibration) -> onnx.ModelProto:
    proto = _opset_at_least(proto, QDQ_OPSET)
    _fold_constants(proto.graph)
    name, shape = _graph_input(proto.graph)
    _graph_output(proto.graph)
    batch = _calibration_batch(calibration, name, shape)
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    values = _float_values(proto.graph, consts, name, batch)
    return _QdqRewriter(proto, consts, values).run(name)


def _opset_at_least(proto: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The fp32 graph in an opset where the QDQ ops it gets are valid.

    From opset 13 on, the :data:`FP32_OPS` mean the same up to ``version``, so
    only the opset number changes; older graphs go through onnx's version
    converter (Clip's min/max attributes become inputs, for instance).
    """
    current = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=version)
    if current >= version:
        return proto
    if current >= 13:
        for o in proto.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = version
    else:
        try:
            proto = onnx.version_converter.convert_version(proto, version)
        except Exception as err:  # the converter raises plain RuntimeErrors
            raise ModelFormatError(f"cannot convert the model from opset {current} to {version}: {err}") from None
    proto.ir_version = max(proto.ir_version, 9)  # opset 19 needs IR version 9 (which lets initializers be non-inputs)
    return proto


def _fold_constants(graph: onnx.GraphProto) -> None:
    """Constant nodes become initializers, so weights, biases and bounds are all found in one place."""
    nodes = list(graph.node)
    for node in nodes:
        if node.op_type == "Constant":
            graph.initializer.append(numpy_helper.from_array(_constant_value(node), node.output[0]))
    del graph.node[:]
    graph.node.extend(n for n in nodes if n.op_type != "Constant")


def _float_values(graph: onnx.GraphProto, consts: dict, input_name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of the fp32 graph on the calibration batch, in float64."""
    vals = dict(consts)
    vals[input_name] = x
    for node in graph.node:
        args = [vals[n] if n else None for n in node.input]
        try:
            vals[node.output[0]] = _FLOAT_OPS[node.op_type](node, args)
        except TinyTrainError:
            raise
        except (ValueError, IndexError) as err:  # numpy shape mismatches between operands
            raise ShapeError(f"{_where(node)}: cannot evaluate on the calibration batch: {err}") from None
    return vals


def _float_conv(node: onnx.NodeProto, args: list) -> np.ndarray:
    x, w = args[0], args[1].astype(np.float64)
    stride, groups = _conv_geometry(node, w.shape, x.shape[1:])
    n, k = x.shape[0], w.shape[2]
    p = (k - 1) // 2
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], k, stride)
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))).reshape(n, groups, -1, x.shape[2] + 2 * p, x.shape[3] + 2 * p)
    wg = w.reshape(groups, -1, w.shape[1], k, k)
    out = np.zeros((n, groups, wg.shape[1], ho, wo))
    for i in range(k):
        for j in range(k):
            patch = xp[..., i:i + stride * ho:stride, j:j + stride * wo:stride]
            out += np.einsum("ngchw,goc->ngohw", patch, wg[..., i, j], optimize=True)
    out = out.reshape(n, -1, ho, wo)
    bias = args[2] if len(args) > 2 else None
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def _float_gemm(node: onnx.NodeProto, args: list) -> np.ndarray:
    b = args[1].T if _gemm_trans_b(node) else args[1]
    y = args[0] @ b
    return y + args[2] if len(args) > 2 and args[2] is not None else y


_FLOAT_OPS = {
    "Conv": _float_conv,
    "Relu": lambda node, a: np.maximum(a[0], 0.0),
    "Clip": lambda node, a: np.clip(a[0], *_clip_bounds(node, *(a[1:] + [None, None])[:2])),
    "Add": lambda node, a: a[0] + a[1],
    "GlobalAveragePool": lambda node, a: a[0].mean(axis=(2, 3), keepdims=True),
    "Flatten": lambda node, a: a[0].reshape(len(a[0]), *_flattened(node, a[0].shape[1:], None)),
    "Reshape": lambda node, a: a[0].reshape(len(a[0]), *_flattened(node, a[0].shape[1:], a[1])),
    "Gemm": _float_gemm,
    "MatMul": lambda node, a: a[0] @ a[1],
}


def _activation_params(lo: float, hi: float) -> tuple[np.float32, int]:
    """Per-tensor asymmetric int8 params whose range includes 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = hi - lo if hi > lo else _ZERO_SPAN_RANGE
    scale = np.float32(span / 255.0)
    return scale, int(np.clip(np.round(-128.0 - lo / float(scale)), INT8_MIN, INT8_MAX))


def _quantized_weight(w: np.ndarray, out_axis: int, x_scale: float, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 weight and float32 scales.

    The scale is ``max|w| / 127``, raised where the bias would not fit int32
    at ``x_scale * w_scale``; an all-zero channel without bias gets a tiny one.
    """
    wm = np.moveaxis(w.astype(np.float64), out_axis, 0)
    need = np.abs(wm).reshape(len(wm), -1).max(axis=1) / 127.0
    if bias is not None:
        need = np.maximum(need, np.abs(bias) / (x_scale * INT32_MAX))
    scales = np.where(need > 0, need, _ZERO_CHANNEL_SCALE).astype(np.float32)
    q = np.clip(np.round(wm / scales.astype(np.float64).reshape(-1, *[1] * (wm.ndim - 1))), -127, 127)
    return np.moveaxis(q.astype(np.int8), 0, out_axis), scales


class _QdqRewriter:
    """Rewrites a calibrated fp32 graph into QDQ form: Q/DQ after the graph input and each compute result, int8 weights, int32 biases."""

    def __init__(self, proto: onnx.ModelProto, consts: dict, values: dict):
        self.proto, self.consts, self.values = proto, consts, values
        g = proto.graph
        self.outputs = {o.name for o in g.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for name in node.input:
                self.users.setdefault(name, []).append(node)
        self.taken = {n for node in g.node for n in (*node.input, *node.output)} | set(consts) | {i.name for i in g.input}
        self.alias: dict[str, str] = {}  # fp32 tensor -> its DequantizeLinear output
        self.scale: dict[str, float] = {}  # float tensor of the new graph -> scale of the int8 tensor it carries
        self.matmul: dict[str, tuple[float, np.ndarray]] = {}  # MatMul output -> (x_scale, w_scales) for its bias Add
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def run(self, input_name: str) -> onnx.ModelProto:
        g = self.proto.graph
        self._quantize(input_name)
        for node in g.node:
            node.input[:] = [self.alias.get(n, n) for n in node.input]
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                self._weights(node)
            elif node.op_type == "Add":
                self._matmul_bias(node)
            self.nodes.append(node)
            out = node.output[0]
            if node.op_type in ("Flatten", "Reshape") and node.input[0] in self.scale:
                self.scale[out] = self.scale[node.input[0]]
            elif self._needs_quant(node):
                self._quantize(out)
        del g.node[:]
        g.node.extend(self.nodes)
        g.initializer.extend(self.inits)
        for o in g.output:
            o.name = self.alias.get(o.name, o.name)
        used = {n for node in g.node for n in node.input}
        for table in (g.initializer, g.input):  # the float weights are replaced (old IRs list them as inputs too)
            keep = [i for i in table if i.name in used or i.name not in self.consts]
            del table[:]
            table.extend(keep)
        return self.proto

    def _fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def _init(self, base: str, array: np.ndarray) -> str:
        name = self._fresh(base)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def _needs_quant(self, node: onnx.NodeProto) -> bool:
        """A compute result is quantized unless its single user is its Relu/Clip (or a MatMul's bias Add)."""
        out = node.output[0]
        users = self.users.get(out, [])
        if out in self.outputs or len(users) != 1:
            return True
        user = users[0]
        if user.op_type in ("Relu", "Clip") and user.input[0] == out:
            return False
        return not (node.op_type == "MatMul" and user.op_type == "Add" and self._const_operand(user) is not None)

    def _const_operand(self, add: onnx.NodeProto) -> str | None:
        consts = [n for n in add.input if n in self.consts]
        return consts[0] if len(consts) == 1 else None

    def _quantize(self, tensor: str) -> None:
        v = self.values[tensor]
        if not np.all(np.isfinite(v)):
            raise ShapeError(f"tensor {tensor!r} is not finite on the calibration batch")
        scale, zero = _activation_params(float(v.min()), float(v.max()))
        s, z = self._init(f"{tensor}/scale", scale), self._init(f"{tensor}/zero_point", np.int8(zero))
        q, dq = self._fresh(f"{tensor}/quantized"), self._fresh(f"{tensor}/dequantized")
        self.nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [q], name=self._fresh(f"{tensor}/QuantizeLinear")))
        self.nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [dq], name=self._fresh(f"{tensor}/DequantizeLinear")))
        self.alias[tensor] = dq
        self.scale[dq] = float(scale)

    def _dq_const(self, base: str, data: np.ndarray, scale: np.ndarray, axis: int = 0) -> str:
        """``DequantizeLinear`` of an int8/int32 initializer with per-channel scales along ``axis``."""
        out = self._fresh(base)
        inputs = [self._init(f"{base}_quantized", data), self._init(f"{base}_scale", scale.astype(np.float32))]
        self.nodes.append(helper.make_node("DequantizeLinear", inputs, [out], name=self._fresh(f"{base}/DequantizeLinear"), axis=axis))
        return out

    def _input_scale(self, node: onnx.NodeProto) -> float:
        if node.input[0] not in self.scale:
            raise UnsupportedOpError(f"{_where(node)}: input {node.input[0]!r} is not a quantized activation")
        return self.scale[node.input[0]]

    def _weights(self, node: onnx.NodeProto) -> None:
        """Conv/Gemm/MatMul: int8 DQ weight, int32 DQ bias."""
        x_scale = self._input_scale(node)
        if node.input[1] not in self.consts:
            raise UnsupportedOpError(f"{_where(node)}: weight {node.input[1]!r} must be a constant initializer")
        w = self.consts[node.input[1]]
        out_axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and _gemm_trans_b(node)) else 1
        bias = self._bias_const(node, 2, w.shape[out_axis])
        q, scales = _quantized_weight(w, out_axis, x_scale, bias)
        node.input[1] = self._dq_const(f"{node.name}/weight", q, scales, out_axis)
        if bias is not None:
            node.input[2] = self._bias(node.name, bias, x_scale, scales)
        if node.op_type == "MatMul":
            self.matmul[node.output[0]] = (x_scale, scales)

    def _bias_const(self, node: onnx.NodeProto, i: int, n: int) -> np.ndarray | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        if node.input[i] not in self.consts:
            raise UnsupportedOpError(f"{_where(node)}: bias {node.input[i]!r} must be a constant initializer")
        return _vector(self.consts[node.input[i]], n, f"{_where(node)}: bias").astype(np.float64)

    def _bias(self, name: str, bias: np.ndarray, x_scale: float, scales: np.ndarray) -> str:
        scale = np.float64(x_scale) * scales.astype(np.float64)
        q = np.clip(np.round(bias / scale), INT32_MIN, INT32_MAX).astype(np.int32)
        return self._dq_const(f"{name}/bias", q, scale.astype(np.float32))

    def _matmul_bias(self, node: onnx.NodeProto) -> None:
        operands = [n for n in node.input if n in self.matmul]
        const = self._const_operand(node)
        if len(operands) == 1 and const is not None:
            x_scale, scales = self.matmul[operands[0]]
            bias = _vector(self.consts[const], len(scales), f"{_where(node)}: bias").astype(np.float64)
            node.input[list(node.input).index(const)] = self._bias(node.name, bias, x_scale, scales)
