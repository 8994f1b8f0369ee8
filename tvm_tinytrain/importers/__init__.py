"""Importers that turn model files into a :class:`tvm_tinytrain.model.Model`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from ..model import Model


def load_model(path: str | Path, calibration: np.ndarray | None = None) -> Model:
    """Load a paper ``.pkl`` or an ONNX model (QDQ int8, or fp32 with ``calibration``)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pkl":
        from .paper_pkl import load_paper_model

        return load_paper_model(path)
    if suffix == ".onnx":
        from .onnx_import import load_onnx

        return load_onnx(str(path), calibration=calibration)
    raise ModelFormatError(f"{path}: unknown model format {suffix or '(no extension)'!r}; expected .pkl or .onnx")
