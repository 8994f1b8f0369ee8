"""The float32 mode of an int8 model, trained with TVM's own autodiff: the baseline of the int8 path.

The paper compares its int8 training (QAS, sparse update) with fine-tuning the
same network in floating point.  This module dequantizes a :class:`Model`
(``W = w_scale[o] * W̄``, ``b = x_scale * w_scale[o] * b̄``), writes it in
high-level Relax ops (``R.nn.conv2d``, ``R.clip``, ``R.add``, ``R.mean``,
``R.matmul``) and lets TVM derive everything else:
``relax.training.SetupTrainer`` appends ``CrossEntropyLoss``, runs
``relax.transform.Gradient`` and adds plain ``SGD`` (no momentum).

Before (model)::

    Conv2D stem(input) -> ... -> GlobalAvgPool pool -> Linear classifier(pool) -> logits (1000)

After (``build_float_backbone``)::

    @R.function
    def backbone(input: R.Tensor((1, 3, 128, 128), "float32"), <frozen params>, <trainable params>):
        with R.dataflow():
            lv = R.nn.conv2d(input, stem_weight, strides=2, padding=1)
            lv1 = R.clip(lv + R.reshape(stem_bias, (1, C, 1, 1)), lo, hi)   # folded ReLU6
            ...
            feat = R.mean(lvK, axis=[2, 3])
            logits = R.matmul(feat, R.permute_dims(classifier_weight)) + classifier_bias   # NEW head
            R.output(logits)
        return logits

The int8 classifier is replaced by a new float32 head of ``num_classes``
outputs (the paper's transfer-learning setup), initialised from ``seed`` with
N(0, 0.01^2) weights and zero biases: small enough to start near the uniform
prediction, yet non-zero so the very first step already sends gradient into
the backbone.  Frozen parameters are passed *before* the trainable ones, as
extra inputs of ``backbone``, so SetupTrainer asks ``Gradient`` only for the
trainable ones and SGD only updates those.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.training import SetupTrainer, Trainer
from tvm.relax.training.loss import CrossEntropyLoss
from tvm.relax.training.optimizer import SGD

from . import relax_gradients  # noqa: F401  (registers the gradient of R.clip)
from .errors import ShapeError, TinyTrainError, UnsupportedOpError
from .model import Add, Conv2D, GlobalAvgPool, Linear, Model
from .relax_build import param_name

HEAD_INIT_STD = 0.01
TARGET = "llvm"


class FloatModeError(TinyTrainError):
    """A bad argument to the float-mode trainer (labels, trainable names, learning rate, class count)."""


@dataclass(frozen=True)
class FloatParams:
    """The dequantized network: float32 conv parameters and each node's real-valued clamp range.

    ``params`` maps the Relax parameter name (:func:`relax_build.param_name`,
    the names the int8 path uses too) to float32 arrays, conv weights and
    biases in graph order.  ``clamps`` maps each Conv2D/Add node name to the
    real interval ``((qmin - y_zero) * y_scale, (qmax - y_zero) * y_scale)``
    that its int8 output can represent: the folded activation.
    """

    params: dict[str, np.ndarray]
    clamps: dict[str, tuple[float, float]]


def split_head(model: Model) -> tuple[list, Linear]:
    """The feature extractor's nodes and the classifier that the float mode replaces.

    The head must be the single Linear producing the model output; a Linear
    anywhere else has no float-mode meaning here.
    """
    head = model.producer(model.output)
    if not isinstance(head, Linear):
        raise UnsupportedOpError(f"model {model.name!r}: output {model.output!r} must be produced by a Linear classifier, "
                                 f"got {type(head).__name__}")
    body = [n for n in model.nodes if n is not head]
    for node in body:
        if not isinstance(node, (Conv2D, Add, GlobalAvgPool)):
            raise UnsupportedOpError(f"node {node.name!r} ({node.op}): only the final classifier may be a Linear in float mode")
    return body, head


def clamp_range(model: Model, node: Conv2D | Add) -> tuple[float, float]:
    """Real values representable between the node's ``qmin`` and ``qmax``: its folded activation."""
    q = model.tensors[node.output].quant
    return (node.qmin - q.zero_point) * q.scale, (node.qmax - q.zero_point) * q.scale


def dequantize_model(model: Model) -> FloatParams:
    """Float32 weights/biases (computed in float64, rounded once) and clamp ranges of the backbone."""
    body, _ = split_head(model)
    params, clamps = {}, {}
    for node in body:
        if isinstance(node, Conv2D):
            w_scale = node.weight_scales.astype(np.float64)
            x_scale = model.tensors[node.input].quant.scale
            params[param_name(node.name, "weight")] = (node.weight.astype(np.float64) * w_scale[:, None, None, None]).astype(np.float32)
            params[param_name(node.name, "bias")] = (node.bias.astype(np.float64) * x_scale * w_scale).astype(np.float32)
        if isinstance(node, (Conv2D, Add)):
            clamps[node.name] = clamp_range(model, node)
    return FloatParams(params, clamps)


def init_head(in_features: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The new classifier: N(0, HEAD_INIT_STD^2) weights from ``seed``, zero biases."""
    if num_classes < 2:
        raise FloatModeError(f"num_classes must be >= 2, got {num_classes}")
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, HEAD_INIT_STD, (num_classes, in_features)).astype(np.float32), np.zeros(num_classes, np.float32)


def float_params(model: Model, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every float parameter in graph order: the dequantized backbone, then the new head."""
    _, head = split_head(model)
    params = dict(dequantize_model(model).params)
    w, b = init_head(head.in_channels, num_classes, seed)
    params[param_name(head.name, "weight")] = w
    params[param_name(head.name, "bias")] = b
    return params


def _order(params: dict[str, np.ndarray], trainable: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """(frozen, trainable) parameter names, each in graph order; reject unknown or empty selections."""
    if trainable is None:
        return [], list(params)
    chosen = set(trainable)
    unknown = sorted(chosen - set(params))
    if unknown:
        raise FloatModeError(f"trainable: unknown parameter names {unknown} (known: {list(params)})")
    if not chosen:
        raise FloatModeError("trainable: the set of parameters to train is empty")
    return [k for k in params if k not in chosen], [k for k in params if k in chosen]


def _emit_node(bb: relax.BlockBuilder, model: Model, node, values: dict, pvars: dict):
    """One Relax expression per node, with the activation as a clip to the node's real range."""
    if isinstance(node, Conv2D):
        pad = node.padding
        y = bb.emit(relax.op.nn.conv2d(values[node.input], pvars[param_name(node.name, "weight")], strides=node.stride,
                                       padding=(pad, pad, pad, pad), groups=node.groups))
        bias = relax.op.reshape(pvars[param_name(node.name, "bias")], (1, node.out_channels, 1, 1))
        return bb.emit(relax.op.clip(relax.op.add(y, bias), *clamp_range(model, node)))
    if isinstance(node, Add):
        return bb.emit(relax.op.clip(relax.op.add(values[node.lhs], values[node.rhs]), *clamp_range(model, node)))
    return bb.emit(relax.op.mean(values[node.input], axis=[2, 3]))


def build_float_backbone(model: Model, num_classes: int, batch: int | None = 1, seed: int = 0,
                         trainable: Iterable[str] | None = None) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """``(IRModule with backbone(input, *frozen, *trainable), params in that order)`` for SetupTrainer.

    The module attrs are ``param_num = len(trainable)`` and ``state_num = 0``,
    so the frozen parameters count as inputs.  ``batch=None`` gives a symbolic
    batch dimension (inference only: the training functions need static shapes).
    """
    body, head = split_head(model)
    all_params = float_params(model, num_classes, seed)
    frozen, train = _order(all_params, trainable)
    params = {k: all_params[k] for k in (*frozen, *train)}
    n = tvm.tirx.Var("n", "int64") if batch is None else batch
    x = relax.Var("input", relax.TensorType([n, *model.input_info.shape], "float32"))
    pvars = {k: relax.Var(k, relax.TensorType(list(v.shape), "float32")) for k, v in params.items()}
    bb = relax.BlockBuilder()
    with bb.function("backbone", [x, *pvars.values()]):
        with bb.dataflow():
            values = {model.input: x}
            for node in body:
                values[node.output] = _emit_node(bb, model, node, values, pvars)
            w, b = pvars[param_name(head.name, "weight")], pvars[param_name(head.name, "bias")]
            logits = bb.emit_output(relax.op.add(relax.op.matmul(values[head.input], relax.op.permute_dims(w)), b))
        bb.emit_func_output(logits)
    mod = bb.get().with_attrs({"param_num": len(train), "state_num": 0})
    return mod, params


def real_input(model: Model, images: np.ndarray) -> np.ndarray:
    """int8 NCHW images -> float32 real values ``x_scale * (q - x_zero)``, checking shape and dtype."""
    images = np.asarray(images)
    expect = tuple(model.input_info.shape)
    if images.dtype != np.int8 or images.ndim != 4 or tuple(images.shape[1:]) != expect:
        raise ShapeError(f"images must be int8 (N, {', '.join(map(str, expect))}), got {images.dtype} {tuple(images.shape)}")
    q = model.input_info.quant
    return ((images.astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)).astype(np.float32)


class FloatTrainer:
    """Fine-tunes the float32 mode of ``model`` on ``num_classes`` classes with SGD, on target llvm.

    The training module (backbone, loss, adjoint, optimizer) is compiled for a
    fixed ``batch``; ``predict``/``evaluate`` use a separately compiled forward
    pass with a symbolic batch, compiled on first use.  ``trainable`` names the
    parameters SGD updates (default: all); the others never get a gradient.
    """

    def __init__(self, model: Model, num_classes: int, lr: float, batch: int = 1, seed: int = 0, trainable: Iterable[str] | None = None):
        if not (np.isfinite(lr) and lr > 0):
            raise FloatModeError(f"lr must be a finite positive number, got {lr!r}")
        if batch < 1:
            raise FloatModeError(f"batch must be >= 1, got {batch}")
        self.model, self.num_classes, self.batch = model, num_classes, batch
        backbone, params = build_float_backbone(model, num_classes, batch, seed, trainable)
        self.trainable = list(params)[len(params) - int(backbone.attrs["param_num"]):]
        loss_args = [relax.TensorType((batch, num_classes), "float32"), relax.TensorType((batch,), "int64")]
        self.train_mod = SetupTrainer(CrossEntropyLoss(reduction="mean"), SGD(lr), loss_args)(backbone)
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(tvm.compile(self.train_mod, target=TARGET), self.device)
        self._optim_state = [s.copyto(self.device) for s in self.train_mod.attrs["optim_state"]]
        self._params = {k: tvm.runtime.tensor(v, self.device) for k, v in params.items()}
        self._infer_vm = None

    # ---- inputs -----------------------------------------------------------
    def _labels(self, labels, n: int) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ShapeError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise FloatModeError(f"labels must lie in [0, {self.num_classes}), got values in [{labels.min()}, {labels.max()}]")
        return labels.astype(np.int64)

    def _train_args(self, images, labels) -> list:
        x = real_input(self.model, images)
        if x.shape[0] != self.batch:
            raise ShapeError(f"images: the training functions are compiled for batch {self.batch}, got {x.shape[0]} images")
        y = self._labels(labels, self.batch)
        return [tvm.runtime.tensor(x, self.device), *self._params.values(), tvm.runtime.tensor(y, self.device)]

    # ---- training ---------------------------------------------------------
    def gradients(self, images, labels) -> tuple[float, dict[str, np.ndarray]]:
        """(mean cross-entropy, gradient of every trainable parameter) without updating anything."""
        loss, grads = self.vm[Trainer.ADJOINT_FUNC](*self._train_args(images, labels))
        return float(loss.numpy()), {k: g.numpy() for k, g in zip(self.trainable, grads)}

    def step(self, images, labels) -> float:
        """One SGD step on a batch of int8 images; returns the loss before the update."""
        loss, grads = self.vm[Trainer.ADJOINT_FUNC](*self._train_args(images, labels))
        old = [self._params[k] for k in self.trainable]
        new, self._optim_state = self.vm[Trainer.OPTIMIZER_FUNC](old, grads, self._optim_state)
        self._params.update(zip(self.trainable, new))
        return float(loss.numpy())

    # ---- inference --------------------------------------------------------
    def _inference_vm(self) -> relax.VirtualMachine:
        if self._infer_vm is None:
            mod, _ = build_float_backbone(self.model, self.num_classes, None, trainable=self.trainable)
            self._infer_vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), self.device)
        return self._infer_vm

    def predict(self, images) -> np.ndarray:
        """float32 logits (N, num_classes) of int8 images, for any N."""
        x = tvm.runtime.tensor(real_input(self.model, images), self.device)
        return self._inference_vm()["backbone"](x, *self._params.values()).numpy()

    def evaluate(self, images, labels, batch: int = 64) -> float:
        """Top-1 accuracy, ``batch`` images at a time to bound the activation memory."""
        if batch < 1:
            raise FloatModeError(f"batch must be >= 1, got {batch}")
        if len(images) == 0:
            raise ShapeError("images: accuracy of an empty set is undefined")
        labels = self._labels(labels, len(images))
        preds = [self.predict(images[i:i + batch]).argmax(axis=1) for i in range(0, len(images), batch)]
        return float(np.mean(np.concatenate(preds) == labels))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Current float32 value of every parameter (trainable and frozen), by Relax parameter name."""
        return {k: v.numpy() for k, v in self._params.items()}
