"""The project's default model: a small int8 CNN pre-trained "in the cloud" on digits 0-4.

The paper fine-tunes a network that was pre-trained on a large source task
(ImageNet) on a new target task on the device.  This module plays the cloud
side at a scale that ships with the repository: a MobileNetV2-style CNN
(:func:`make_default_cnn`: 3x32x32 input, 13 convs, 1.18 M MACs) is trained
on the SOURCE task, scikit-learn's digits 0-4, and quantized with the
project's own post-training quantization.  The result is a QDQ int8 ONNX file
of 37 KB (:data:`DEFAULT_MODEL_PATH`); the demo then adapts it on the
emulated board to the unseen digits 5-9 (the TARGET task).

Pipeline of :func:`pretrain` (every step seeded, so the same seed gives the
same bytes on the same machine)::

    fp32 ONNX (random init)  --load_onnx + calibration-->  int8 Model (PTQ)
        --FloatTrainer: SGD of every parameter in float32, TVM's autodiff-->  trained float weights
        --written back into the fp32 ONNX, with the float mode's clamps-->  fp32 ONNX (trained)
        --load_onnx + calibration (PTQ again)--> export_onnx -->  default_model.onnx (QDQ int8)

The float mode trains the *int8 model's* function: each Conv/Add output is
clipped to the real range its int8 tensor can hold (calibrated on the random
network).  The trained fp32 ONNX therefore gets those clamps as ``Clip``
nodes; without them its unbounded ReLUs and linear projections would compute
another function than the one trained (``make_fp32_cnn`` trained at lr 0.2
lost 6 points of source accuracy that way; this schedule happens to stay
inside the ranges, but nothing guarantees it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .data import digits, pick_classes
from .errors import TinyTrainError
from .model import Model

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "data" / "default_model.onnx"
MODEL_NAME = "tinytrain-default"
INPUT_SHAPE = (3, 32, 32)
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
CALIBRATION_IMAGES = 256  # PTQ batch: the first images of the source train split


@dataclass(frozen=True)
class Schedule:
    """Float32 pre-training: ``epochs`` over the source train split, plain SGD at ``lr``, ``batch`` images per step."""

    epochs: int = 20
    lr: float = 0.05
    batch: int = 8


@dataclass(frozen=True)
class Task:
    """One task's digits, labels remapped to ``0..len(classes)-1``; images int8 NCHW as the model reads them."""

    classes: tuple[int, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def make_default_cnn(seed: int = 0, num_classes: int = len(SOURCE_CLASSES)) -> onnx.ModelProto:
    """The fp32 architecture: :func:`.importers.onnx_testing.make_fp32_cnn` with two more inverted residual blocks.

    The features are what transfers to the target task.  ``make_fp32_cnn``
    ends in 24 channels at 8x8: pre-trained on digits 0-4 with the default
    schedule, a logistic regression on its pooled features scores 86 % on
    the digits 5-9 test split.  A third block (24 channels, residual) and a
    fourth (stride 2, 48 channels at 4x4, linear output like MCUNet's last
    block) raise that to 91 %, for 1.18 M MACs instead of 0.74 M.  Same
    builder (the one ``make_fp32_cnn`` uses), so the same He initialisation
    and node names (``stem``, ``blockN.expand/dw/project/add``, ``classifier``).
    """
    from .importers.onnx_testing import OPSET, CnnBuilder

    c, h, w = INPUT_SHAPE
    b = CnnBuilder(np.random.default_rng(seed), c)
    x = b.act("stem_relu", b.conv("stem", "input", 16, 3, 2), relu6=False)
    x = b.block("block1", x, expand=2, out_ch=16, stride=1)
    x = b.block("block2", x, expand=3, out_ch=24, stride=2)
    x = b.block("block3", x, expand=3, out_ch=24, stride=1)
    x = b.block("block4", x, expand=3, out_ch=48, stride=2)
    out = b.head(x, num_classes)
    graph = helper.make_graph(b.nodes, MODEL_NAME, [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", c, h, w])],
                              [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, ["N", num_classes])], b.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tvm-tinytrain")
    proto.ir_version = 7
    return proto


def task(classes: tuple[int, ...], seed: int = 0) -> Task:
    """The digits of ``classes`` from :func:`.data.digits`' seeded train/test split, labels renumbered in ``classes`` order."""
    train_x, train_y, test_x, test_y = digits(INPUT_SHAPE[1:], INPUT_SHAPE[0], seed)
    return Task(tuple(classes), *pick_classes(train_x, train_y, classes), *pick_classes(test_x, test_y, classes))


def as_float(images: np.ndarray) -> np.ndarray:
    """int8 images (``pixel - 128``) -> float32 ``pixel / 127.5 - 1`` in [-1, 1], the fp32 network's input."""
    return ((images.astype(np.float32) + 128.0) / 127.5 - 1.0).astype(np.float32)


def calibration_batch(source: Task) -> np.ndarray:
    """The PTQ batch: source *train* images only, so the test split never shapes the quantization."""
    return as_float(source.train_x[:CALIBRATION_IMAGES])


def pretrain_float(seed: int = 0, schedule: Schedule = Schedule(), source: Task | None = None) -> onnx.ModelProto:
    """The fp32 ONNX CNN (random init from ``seed``) trained on the source task in float32, its clamps as Clip nodes."""
    from .float_mode import FloatTrainer, dequantize_model
    from .importers.onnx_import import load_onnx

    source = source or task(SOURCE_CLASSES)
    proto = make_default_cnn(seed, len(source.classes))
    model = load_onnx(proto, calibration=calibration_batch(source), name=MODEL_NAME)
    trainer = FloatTrainer(model, len(source.classes), lr=schedule.lr, batch=schedule.batch, seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(schedule.epochs):
        order = rng.permutation(len(source.train_y))
        for i in range(0, len(order) - schedule.batch + 1, schedule.batch):
            batch = order[i:i + schedule.batch]
            trainer.step(source.train_x[batch], source.train_y[batch])
    trained = with_weights(proto, trainer.state_dict())
    return with_clamps(trained, model, dequantize_model(model).clamps)


def quantize(fp32: onnx.ModelProto, source: Task | None = None) -> onnx.ModelProto:
    """PTQ of the trained fp32 network on the source calibration batch, exported as QDQ int8 ONNX."""
    from .importers.onnx_export import export_onnx
    from .importers.onnx_import import load_onnx

    source = source or task(SOURCE_CLASSES)
    return export_onnx(load_onnx(fp32, calibration=calibration_batch(source), name=MODEL_NAME))


def pretrain(seed: int = 0, schedule: Schedule = Schedule()) -> onnx.ModelProto:
    """The default model from scratch: float32 pre-training on digits 0-4, then int8 PTQ (QDQ ONNX)."""
    source = task(SOURCE_CLASSES)
    return quantize(pretrain_float(seed, schedule, source), source)


def load_default_model(path: str | Path = DEFAULT_MODEL_PATH) -> Model:
    """The shipped int8 default model (5-class int8 classifier for digits 0-4)."""
    from .importers.onnx_import import load_onnx

    if not Path(path).exists():
        raise TinyTrainError(f"{path}: default model not found; regenerate it with `python scripts/pretrain_default_model.py --seed 0`")
    return load_onnx(str(path))


def with_weights(proto: onnx.ModelProto, params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the fp32 graph whose Conv/Gemm initializers hold ``params`` (float-mode names, see :func:`.relax_build.param_name`)."""
    from .relax_build import param_name

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {i.name: i for i in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        for field, init in zip(("weight", "bias"), node.input[1:3]):
            name = param_name(node.name, field)
            if name not in params:
                raise TinyTrainError(f"node {node.name!r}: no trained {field} {name!r} among the float parameters")
            if tuple(params[name].shape) != tuple(inits[init].dims):
                raise TinyTrainError(f"node {node.name!r}: trained {field} has shape {params[name].shape}, "
                                     f"the graph's {init!r} {tuple(inits[init].dims)}")
            inits[init].CopyFrom(numpy_helper.from_array(params[name].astype(np.float32), init))
    return out


def with_clamps(proto: onnx.ModelProto, model: Model, clamps: dict[str, tuple[float, float]]) -> onnx.ModelProto:
    """A copy of the fp32 graph where each clamped node's Model output goes through ``Clip(lo, hi)``.

    ``clamps`` maps Model node names (the ONNX Conv/Add names) to real
    intervals.  The Clip takes over the tensor's name, so consumers, and
    the Model tensor names after PTQ, stay the same; the tensor it clips
    (after the node's own Relu/Clip, if any) becomes ``<tensor>/unclamped``.
    """
    owner = {node.output: node.name for node in model.nodes if node.name in clamps}
    missing = sorted(set(clamps) - set(owner.values()))
    if missing:
        raise TinyTrainError(f"model {model.name!r}: clamps name nodes it does not have: {missing}")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = []
    for original in out.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        nodes.append(node)
        tensor = node.output[0]
        if tensor not in owner:
            continue
        name = owner[tensor]
        bounds = [f"{name}/clamp_min", f"{name}/clamp_max"]
        out.graph.initializer.extend(numpy_helper.from_array(np.float32(v), b) for v, b in zip(clamps[name], bounds))
        node.output[0] = f"{tensor}/unclamped"
        nodes.append(helper.make_node("Clip", [node.output[0], *bounds], [tensor], name=f"{name}/clamp"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
