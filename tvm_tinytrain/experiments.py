"""What the experiment scripts (``scripts/exp_*.py``) share: one train/eval loop, the tasks, seeds and records.

The arms of a comparison differ only in what is compared (QAS on or off,
the scheme, the accumulation, int8 or float32, the lr or epochs where that is
the point); the rest comes from here and is the same for every arm: the
task's train/test split, the order of the training images (``seed``), the
new head's initial weights (the same ``seed``: :class:`.trainer.Int8Trainer`
and :class:`.float_mode.FloatTrainer` draw it alike), batch 1, plain SGD.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .default_model import TARGET_CLASSES, Task, task
from .errors import TinyTrainError
from .model import Model
from .relax_build import param_name
from .scheme import layer_updates, parse_scheme

RESULTS = Path(__file__).resolve().parents[1] / "results"


def adaptation_task() -> Task:
    """The default model's target task, as in ``make demo``: digits 5-9 (5 classes), the split of seed 0."""
    return task(TARGET_CLASSES)


def digits_task(model: Model) -> Task:
    """All ten digits at the model's input size and channels, the split of seed 0."""
    from .data import digits

    c, h, w = model.input_info.shape
    return Task(tuple(range(10)), *digits((h, w), c, 0))


def float_trainable(model: Model, scheme: str, whole_slices: bool = False) -> list[str]:
    """The float-mode parameter names that ``scheme`` trains in int8, classifier included.

    The float mode trains whole tensors, so a scheme that trains a channel
    slice of a weight has no float counterpart and is refused, unless
    ``whole_slices`` (e.g. for timing) lets the whole weight stand for its slice.
    """
    from .float_mode import split_head

    names = [param_name(split_head(model)[1].name, f) for f in ("weight", "bias")]
    conv_channels = {c.name: c.in_channels for c in model.convs()}  # depthwise: in == out channels
    for up in layer_updates(parse_scheme(scheme, model), model):
        if not whole_slices and up.channels is not None and len(up.channels) != conv_channels[up.node]:
            raise TinyTrainError(f"scheme {scheme!r}: conv {up.conv_index} trains {len(up.channels)} of {conv_channels[up.node]} channels; "
                                 "the float mode trains whole weights only")
        names += [param_name(up.node, "bias")] * up.bias + [param_name(up.node, "weight")] * (up.channels is not None)
    return names


class Arm:
    """One training configuration of a comparison; :meth:`run` trains it from the model's weights for one lr and seed.

    ``mode``: ``float32`` (the dequantized network, TVM's autodiff),
    ``int8+qas`` or ``int8`` (no QAS).  The int8 step is compiled once per
    arm: the lr and every parameter are inputs of the compiled step, so a run
    only resets the backbone and re-draws the head from the seed, as
    ``AppendLoss(head_seed=seed)`` draws it (:func:`.float_mode.init_head`).
    The float32 trainer has its lr compiled into SGD and is rebuilt per run.
    """

    def __init__(self, mode: str, model: Model, task_: Task, scheme: str, accumulate: int = 1):
        if mode not in ("float32", "int8+qas", "int8"):
            raise TinyTrainError(f"unknown mode {mode!r}; expected float32, int8+qas or int8")
        if mode == "float32" and accumulate != 1:
            raise TinyTrainError("float32 mode: gradient accumulation is not supported here")
        self.mode, self.model, self.task, self.scheme, self.accumulate = mode, model, task_, scheme, accumulate
        self._int8 = None

    def _trainer(self, lr: float, seed: int):
        from relax_passes.append_loss import HEAD_PARAMS

        from .float_mode import FloatTrainer, init_head
        from .trainer import Int8Trainer

        classes = len(self.task.classes)
        if self.mode == "float32":
            return FloatTrainer(self.model, classes, lr, seed=seed, trainable=float_trainable(self.model, self.scheme))
        if self._int8 is None:
            self._int8 = Int8Trainer(self.model, self.scheme, num_classes=classes, lr=lr, qas=self.mode == "int8+qas", head_seed=seed,
                                     accumulate=self.accumulate)
            self._initial = {k: v.copy() for k, v in self._int8.params.items()}
        trainer = self._int8
        trainer.lr = float(lr)
        trainer.params = {k: v.copy() for k, v in self._initial.items()}
        head_w, head_b = HEAD_PARAMS
        trainer.params[head_w], trainer.params[head_b] = init_head(self._initial[head_w].shape[1], classes, seed)
        return trainer

    def run(self, lr: float, seed: int, epochs: int) -> dict:
        """Train and score once; int8 adds its planned peak SRAM and the share of int8/int32 backbone values the training changed."""
        start = time.perf_counter()
        trainer = self._trainer(lr, seed)
        out = {"mode": self.mode, "scheme": self.scheme, "lr": lr, "epochs": epochs, "seed": seed, "accumulate": self.accumulate}
        int8 = self.mode != "float32"
        if int8:
            plan = trainer.memory_plan()
            out.update(peak_sram_bytes=int(plan.peak_sram_bytes), arena_bytes=int(plan.arena_bytes), trainable_param_bytes=int(plan.trainable_param_bytes))
            before = {k: v.copy() for k, v in trainer.params.items() if k in trainer.updated and v.dtype != np.float32}
        out.update(fit(trainer, self.task, epochs, seed))
        if int8:  # naive int8's updates round to zero: the share of backbone values that moved shows it
            moved = sum(int(np.count_nonzero(trainer.params[k] != v)) for k, v in before.items())
            out["changed_backbone_values"] = moved / max(1, sum(v.size for v in before.values()))
        out["seconds"] = round(time.perf_counter() - start, 2)
        return out


def fit(trainer, task_: Task, epochs: int, seed: int) -> dict:
    """Train batch 1 for ``epochs`` passes over the train split in the order drawn from ``seed``; score the test split.

    Works with either trainer (int8: one image per call; float32: a batch
    of one).  Pending accumulated gradients are applied at the end.
    Returns the test accuracy, the mean loss of the last epoch, the steps
    and the training seconds.
    """
    from .float_mode import FloatTrainer

    rng = np.random.default_rng(seed)
    losses, start = [], time.perf_counter()
    for _ in range(epochs):
        losses = []
        for k in rng.permutation(len(task_.train_y)):
            if isinstance(trainer, FloatTrainer):
                losses.append(trainer.step(task_.train_x[k:k + 1], task_.train_y[k:k + 1]))
            else:
                losses.append(trainer.step(task_.train_x[k], int(task_.train_y[k])))
    if hasattr(trainer, "flush"):
        trainer.flush()
    seconds = time.perf_counter() - start
    return {"accuracy": trainer.evaluate(task_.test_x, task_.test_y), "last_epoch_loss": float(np.mean(losses)) if losses else None,
            "steps": epochs * len(task_.train_y), "train_seconds": round(seconds, 2)}


def summarize(values) -> dict:
    """Mean, population std, min and max of per-seed values (and the values)."""
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        raise TinyTrainError("summarize: no values")
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}


def percent(summary: dict) -> str:
    """A :func:`summarize` of accuracies as the README tables print it: ``mean ± std (min-max)`` in %."""
    return f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f} ({100 * summary['min']:.1f}-{100 * summary['max']:.1f})"


def machine() -> str:
    """The machine the numbers come from: CPU model, core count, OS, Python."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines() if line.startswith("model name")), platform.processor())
    osname = next((line.split("=", 1)[1].strip('"') for line in _read("/etc/os-release").splitlines() if line.startswith("PRETTY_NAME=")), platform.system())
    return f"{cpu}, {os.cpu_count()} cores, {osname}, Python {platform.python_version()}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def write_record(name: str, record: dict) -> Path:
    """``results/<name>.json`` with the machine and the exact command added."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    full = {"machine": machine(), "command": "python " + shlex.join(sys.argv), **record}
    path.write_text(json.dumps(full, indent=1) + "\n")
    return path
