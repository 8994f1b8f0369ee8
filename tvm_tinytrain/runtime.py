"""Compile a model's Relax graph with TVM and run it on the host (Relax VM)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .errors import ShapeError
from .model import Model
from .relax_build import build_relax


class CompiledModel:
    """int8 inference of ``model`` compiled by TVM for ``target`` (default llvm)."""

    def __init__(self, model: Model, batch: int = 1, target: str = "llvm"):
        self.model = model
        self.batch = batch
        mod, params = build_relax(model, batch)
        self.mod = mod
        self._params = [tvm.runtime.tensor(np.ascontiguousarray(v)) for v in params.values()]
        self._vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.model.input_info.shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape != self.input_shape or x.dtype != np.int8:
            raise ShapeError(f"model {self.model.name!r} input {self.model.input!r} expects int8 {self.input_shape}, got {x.dtype} {x.shape}")
        out = self._vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x)), *self._params)
        return out.numpy()
