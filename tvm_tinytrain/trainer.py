"""Host trainer: the int8 training step compiled by TVM (llvm) and driven from Python.

It runs the same pipeline the device build uses: model -> Relax -> AppendLoss
-> QuantizedGradient -> SparseUpdate -> ReorderUpdates -> FuseConvRequant -> StreamInputRows -> the other fusions
-> PlanMemory, then
compiles ``train_step`` and ``infer`` and keeps the parameters between steps
(the VM returns updated parameters; on the device they are updated in place).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .errors import ShapeError, TinyTrainError
from .model import Model
from .ops.dsp import LowerDSPIntrinsics
from .ops.schedule import kernel_variant
from .relax_build import build_relax


def build_training_module(model: Model, scheme: str = "full", num_classes: int = 10, qas: bool = True, reorder: bool = True,
                          batch: int = 1, head_seed: int = 0, budget_bytes: int | None = None,
                          accumulate: bool = False, kernels: str = "reference") -> tvm.IRModule:
    """The planned training IRModule (``train_step``, ``infer``) of ``model`` under ``scheme``.

    With ``budget_bytes``, a step whose planned peak SRAM exceeds it is an error saying by how much.
    With ``accumulate`` it also has ``accumulate_step`` and ``apply_updates`` (:class:`AccumulateGradients`).
    ``kernels`` picks the kernels' schedules (``tvm_tinytrain.ops.schedule``): "reference" or "optimized",
    which give the same bits; the module attribute ``tinytrain.kernels`` records the choice.
    """
    from relax_passes import (
        AccumulateGradients,
        AppendLoss,
        CheckpointMasks,
        DepthwiseInPlace,
        FuseConvRequant,
        FuseDepthwiseBackward,
        FuseExpandDepthwise,
        FuseWeightUpdate,
        NarrowPeakTiles,
        PlanMemory,
        PointwiseInPlace,
        QuantizedGradient,
        RecomputeStreamedExpansion,
        ReorderUpdates,
        ResidualBackwardInPlace,
        SparseUpdate,
        StreamInputRows,
    )

    with kernel_variant(kernels):
        mod, _ = build_relax(model, batch)
        seq = tvm.transform.Sequential([
            AppendLoss(num_classes, head_seed), QuantizedGradient(qas), SparseUpdate(scheme), ReorderUpdates(reorder),
            *([AccumulateGradients()] if accumulate else []),
            FuseConvRequant(), StreamInputRows(), FuseWeightUpdate(), FuseDepthwiseBackward(), FuseExpandDepthwise(), DepthwiseInPlace(),
            PointwiseInPlace(), ResidualBackwardInPlace(), NarrowPeakTiles(), CheckpointMasks(), ResidualBackwardInPlace(), NarrowPeakTiles(),
            RecomputeStreamedExpansion(), PlanMemory(),
            *([PlanMemory("accumulate_step")] if accumulate else []),
        ])
        out = seq(mod).with_attr("tinytrain.kernels", kernels)
    if budget_bytes is not None:
        from relax_passes import memory_plan

        peak = memory_plan(out).peak_sram_bytes
        if peak > budget_bytes:
            raise TinyTrainError(f"budget: scheme {scheme!r} on {model.name} needs {peak} bytes ({peak / 1024:.1f} KB) of SRAM, "
                                 f"{peak - budget_bytes} bytes over the budget of {budget_bytes} bytes ({budget_bytes / 1024:.1f} KB)")
    return out


class Int8Trainer:
    """``step(image, label) -> loss`` on TVM-compiled int8 training, plus evaluation and saving."""

    def __init__(self, model: Model, scheme: str = "full", num_classes: int = 10, lr: float = 0.003, qas: bool = True,
                 reorder: bool = True, head_seed: int = 0, target: str = "llvm", budget_bytes: int | None = None,
                 accumulate: int = 1, kernels: str = "reference"):
        """``accumulate`` > 1: sum the gradients of that many images (batch 1 each), then update once with their mean.
        ``kernels``: "reference" or "optimized" schedules (the same bits)."""
        if accumulate < 1:
            raise TinyTrainError(f"accumulate must be >= 1, got {accumulate}")
        self.model = model
        self.num_classes = num_classes
        self.lr = float(lr)
        self.accumulate = accumulate
        mod = build_training_module(model, scheme, num_classes, qas, reorder, 1, head_seed, budget_bytes, accumulate > 1, kernels)
        self.mod = mod
        step = mod["train_step"]
        self.updated = [str(n) for n in step.attrs["tinytrain.updated_params"]]
        self._step_params = [p.name for p in step.params[3:]]
        self._infer_params = [p.name for p in mod["infer"].params[1:]]
        self.params = {k: v.numpy() for k, v in mod.attrs["tinytrain.param_init"].items()}
        self._acc = {n: np.zeros([int(d) for d in p.ty.shape], np.float32) for n, p in self._acc_params().items()}
        self._pending = 0
        # The llvm target cannot link the C helpers behind the DSP calls: they become plain TIR arithmetic.
        self._vm = relax.VirtualMachine(tvm.compile(LowerDSPIntrinsics()(mod), target=target), tvm.cpu())

    def _acc_params(self) -> dict:
        if self.accumulate == 1:
            return {}
        return {p.name: p for p in self.mod["accumulate_step"].params if p.name.endswith("_acc")}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, *self.model.input_info.shape)

    def _check_image(self, image) -> np.ndarray:
        image = np.asarray(image)
        if image.shape == self.input_shape[1:]:
            image = image[None]
        if image.shape != self.input_shape or image.dtype != np.int8:
            raise ShapeError(f"model {self.model.name!r} input expects int8 {self.input_shape[1:]}, got {image.dtype} {image.shape[1:]}")
        return np.ascontiguousarray(image)

    def step(self, image: np.ndarray, label: int) -> float:
        """One SGD step (batch 1); updates the trained parameters and returns the loss."""
        image = self._check_image(image)
        if not 0 <= int(label) < self.num_classes:
            raise TinyTrainError(f"label {label} out of range [0, {self.num_classes - 1}]")
        args = [image, np.array([label], np.int32), np.array([self.lr], np.float32)] + [self.params[n] for n in self._step_params]
        if self.accumulate == 1:
            out = self._call("train_step", args)
            for i, name in enumerate(self.updated):
                self.params[name] = out[i + 1].numpy()
            return float(out[0].numpy()[0])
        out = self._call("accumulate_step", args + list(self._acc.values()))
        for i, name in enumerate(self._acc):
            self._acc[name] = out[i + 1].numpy()
        self._pending += 1
        if self._pending == self.accumulate:
            self.flush()
        return float(out[0].numpy()[0])

    def flush(self) -> None:
        """Apply the accumulated gradients (their mean) and clear them; a no-op when nothing is pending."""
        if self._pending == 0:
            return
        lr = np.array([self.lr / self._pending], np.float32)
        out = self._call("apply_updates", [lr] + [self.params[n] for n in self.updated] + list(self._acc.values()))
        for i, name in enumerate(self.updated):
            self.params[name] = out[i].numpy()
        self._acc = {k: np.zeros_like(v) for k, v in self._acc.items()}
        self._pending = 0

    def _call(self, func: str, args):
        return self._vm[func](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args])

    def predict(self, image: np.ndarray) -> np.ndarray:
        image = self._check_image(image)
        args = [image] + [self.params[n] for n in self._infer_params]
        return self._vm["infer"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]).numpy()[0]

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> float:
        hits = sum(int(np.argmax(self.predict(img)) == int(lab)) for img, lab in zip(images, labels))
        return hits / max(1, len(labels))

    def weights(self) -> dict[str, np.ndarray]:
        """Every parameter of the model by name, with trained channel slices merged into their full weights."""
        slices = json.loads(str(self.mod.attrs["tinytrain.trained_slices"])) if "tinytrain.trained_slices" in self.mod.attrs else {}
        out = {k: v for k, v in self.params.items() if k not in slices}
        for name, sl in slices.items():
            full = out[sl["base"]].copy()
            index = [slice(None)] * full.ndim
            index[sl["axis"]] = sl["channels"]
            full[tuple(index)] = self.params[name]
            out[sl["base"]] = full
        return out

    def memory_plan(self):
        """The plan of the step this trainer runs (``accumulate_step`` when accumulating)."""
        from relax_passes import memory_plan

        return memory_plan(self.mod, "accumulate_step" if self.accumulate > 1 else "train_step")

    def save(self, path: str | Path) -> None:
        """All parameters (trained and frozen) as a .npz, by Relax parameter name (see :meth:`weights`)."""
        with open(path, "wb") as f:  # to a file object, np.savez appends no ".npz" to the name given
            np.savez(f, **self.weights())
