"""Model -> C -> board project -> run -> trained model: the device half of the pipeline.

``build_project`` plans the training step, emits it as C (:mod:`.codegen`) and
builds it with one of the templates in ``microtvm_projects/``; ``run_project``
feeds it a dataset and collects the log, and ``trained_model`` turns the
weights the board wrote back into a :class:`Model` (for ONNX export).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from .errors import TinyTrainError
from .model import Linear, Model, TensorInfo
from .relax_build import param_name

PROJECTS = Path(__file__).resolve().parents[1] / "microtvm_projects"
# CLI target -> (template folder, its options)
TARGETS = {
    "host": ("host", {}),
    "qemu-m4": ("qemu-cortex-m", {"machine": "mps2-an386"}),
    "qemu-m7": ("qemu-cortex-m", {"machine": "mps2-an500"}),
    "stm32f746": ("stm32f746", {}),
}
BUILD_JSON = "tinytrain_build.json"


def load_board(folder: str):
    """A template's ``project.py`` (board folders are not Python packages, so it is loaded by path)."""
    path = PROJECTS / folder / "project.py"
    if not path.exists():
        raise TinyTrainError(f"board template {path} not found (the project templates ship with the repository)")
    spec = importlib.util.spec_from_file_location(f"tinytrain_board_{folder.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _board(target: str):
    if target not in TARGETS:
        raise TinyTrainError(f"target {target!r} unknown; expected one of {', '.join(TARGETS)}")
    folder, options = TARGETS[target]
    return load_board(folder), dict(options)


def _project_errors(fn, *args, **kwargs):
    """Run a driver call, turning its ProjectError into our one-line TinyTrainError."""
    driver = sys.modules.get("tinytrain_projects_driver")
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        if driver is not None and isinstance(err, driver.ProjectError):
            raise TinyTrainError(str(err)) from None
        raise


def build_project(model_path: str, model: Model, scheme: str, target: str, out_dir, num_classes: int = 10, lr: float = 0.003,
                  board_options: dict | None = None, kernels: str = "optimized") -> dict:
    """Generate the C training step of ``model`` under ``scheme`` and build it for ``target`` in ``out_dir``.

    ``kernels``: the kernels' schedules, "optimized" or "reference" (``tvm_tinytrain.ops.schedule``; the same bits).
    """
    from .codegen import generate
    from .trainer import build_training_module

    board, options = _board(target)
    out = Path(out_dir)
    mod = build_training_module(model, scheme, num_classes, kernels=kernels)
    meta = generate(mod, out / "model", lr=lr)
    project = out / "project"
    _project_errors(board.generate_project, out / "model", project, **{**options, **(board_options or {})})
    info = _project_errors(board.build, project)
    record = {"model_path": str(Path(model_path).resolve()), "target": target, "scheme": scheme, "kernels": kernels, "num_classes": num_classes,
              "lr": lr, "input_shape": list(model.input_info.shape), "build": {k: (str(v) if isinstance(v, Path) else v)
                                                                               for k, v in vars(info).items()},
              "planned_peak_sram_bytes": meta["peak_sram_bytes"]}
    (out / BUILD_JSON).write_text(json.dumps(record, indent=1))
    return record


def read_build(build_dir) -> dict:
    path = Path(build_dir) / BUILD_JSON
    if not path.exists():
        raise TinyTrainError(f"{build_dir}: not a tinytrain build folder (no {BUILD_JSON}); run `tinytrain build` first")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TinyTrainError(f"{path}: damaged ({str(err)[:120]}); run `tinytrain build` again") from None
    fields = {"model_path": str, "target": str, "scheme": str, "num_classes": int, "input_shape": list}
    for key, typ in fields.items():
        if not isinstance(record, dict) or not isinstance(record.get(key), typ):
            raise TinyTrainError(f"{path}: field '{key}' missing or not {typ.__name__}; run `tinytrain build` again")
    shape = record["input_shape"]
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise TinyTrainError(f"{path}: field 'input_shape' = {shape!r} must be three positive ints; run `tinytrain build` again")
    return record


def run_project(build_dir, data_file, steps: int, lr: float | None = None, eval_count: int = 0, timeout_s: float = 600.0) -> dict:
    """Train ``steps`` steps on the built project; returns the board's log with SRAM/flash/instructions."""
    record = read_build(build_dir)
    board, _ = _board(record["target"])
    out = Path(build_dir) / "run"
    result = _project_errors(board.run, Path(build_dir) / "project", data_file, steps, out, lr=lr, eval_count=eval_count, timeout_s=timeout_s)
    return {"target": record["target"], "scheme": record["scheme"], **result}


def write_dataset(path, images: np.ndarray, labels: np.ndarray, num_classes: int) -> Path:
    board = load_board("host")  # any board: the dataset format is the shared driver's
    return board.driver.write_dataset(path, images, labels, num_classes)


def trained_model(build_dir) -> Model:
    """The model with the weights the board's last run wrote (trained slices merged, the new float head)."""
    from .importers import load_model

    record = read_build(build_dir)
    meta = _project_errors(load_board("host").driver.read_meta, Path(build_dir) / "model")
    weights_path = Path(build_dir) / "run" / "weights.bin"
    if not weights_path.exists():
        raise TinyTrainError(f"{build_dir}: no trained weights yet ({weights_path}); run `tinytrain run` first")
    trained = _project_errors(load_board("host").driver.read_weights, meta, weights_path)
    model = copy.deepcopy(load_model(record["model_path"]))
    slices = meta.get("trained_slices", {})
    for conv in model.convs():
        for field in ("weight", "bias"):
            name = param_name(conv.name, field)
            if name in trained:
                setattr(conv, field, trained[name])
            if f"{name}_trained" in trained:
                sl = slices[f"{name}_trained"]
                full = getattr(conv, field).copy()
                index = [slice(None)] * full.ndim
                index[sl["axis"]] = sl["channels"]
                full[tuple(index)] = trained[f"{name}_trained"]
                setattr(conv, field, full)
    head = model.nodes[-1]
    if not isinstance(head, Linear):
        raise TinyTrainError(f"{record['model_path']}: the model does not end in a classifier")
    w, b = trained["classifier_weight"], trained["classifier_bias"]
    model.nodes[-1] = Linear(head.name, head.input, head.output, w, b)
    model.tensors[head.output] = TensorInfo(head.output, (w.shape[0],), "float32")
    return model.validate()
