"""Sparse-update schemes: which biases, which weights and which channels a step trains.

A scheme (PAPER.md section 3) is ``n_bias_update`` (biases of the last n
convs), ``weight_idx`` (conv indices whose weights are trained) and
``weight_ratio`` (per listed conv, the fraction of input channels trained,
the largest-magnitude ones; depthwise: of output channels).  The new float32
classifier is always trained.

Spellings accepted by :func:`parse_scheme`:

- ``paper-<label>``: a published scheme for the model (e.g. ``paper-99kb``);
- ``full``: every weight and bias;
- ``bias-only:N``: biases of the last N convs;
- ``last-k:N``: weights and biases of the last N convs;
- a path to a JSON file ``{"n_bias_update": 22, "weight_idx": [...], "weight_ratio": [...]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TinyTrainError
from .model import Conv2D, Model

# (n_bias, weight_idx, weight_ratio) per model and label, as published.  A
# ratio of 0 in the paper's table means "listed but not trained": dropped.
PAPER_SCHEMES: dict[str, dict[str, tuple[int, tuple[int, ...], tuple[float, ...]]]] = {
    "mcunet-5fps": {
        "49kb": (20, (23, 24, 27, 30, 33, 39), (0, 0.25, 0.5, 0.5, 0, 0)),
        "74kb": (21, (21, 23, 24, 26, 27, 30), (1, 0, 1, 0, 0.5, 1)),
        "99kb": (22, (21, 24, 27, 30, 36, 39), (1, 1, 1, 1, 0.125, 0.25)),
        "124kb": (24, (21, 24, 27, 30, 33, 39), (0.25, 1, 1, 1, 0.5, 0.5)),
        "148kb": (23, (21, 24, 27, 30, 36, 39), (1, 1, 1, 1, 1, 0.5)),
    },
    "mbv2-w0.35": {
        "49kb": (16, (36, 39, 40, 41, 42, 45, 48, 49), (1, 1, 0, 0.25, 0.125, 0.125, 0.125, 0.125)),
        "99kb": (25, (27, 30, 33, 36, 39, 42, 45, 48), (1, 1, 1, 1, 1, 0.125, 0.5, 1)),
        "138kb": (34, (27, 30, 33, 36, 39, 42, 45, 48), (1, 1, 1, 1, 1, 1, 1, 1)),
    },
    "proxyless-w0.3": {
        "49kb": (21, (39, 42, 44, 45, 50, 51, 54, 57), (0.25, 1, 0, 1, 0, 0.125, 0.25, 0.25)),
        "98kb": (25, (36, 39, 42, 45, 48, 51, 54, 57), (1, 0.5, 1, 1, 0.25, 0.5, 1, 1)),
        "148kb": (45, (36, 39, 42, 45, 48, 51, 54, 57), (1, 1, 1, 1, 1, 1, 1, 1)),
    },
}


@dataclass(frozen=True)
class SparseScheme:
    n_bias_update: int
    weight_idx: tuple[int, ...] = ()
    weight_ratio: tuple[float, ...] = ()
    name: str = field(default="custom", compare=False)

    def to_json(self) -> dict:
        return {"n_bias_update": self.n_bias_update, "weight_idx": list(self.weight_idx), "weight_ratio": list(self.weight_ratio)}


@dataclass(frozen=True)
class LayerUpdate:
    """What one conv trains: its bias, and the weight channels (None: weight frozen)."""

    conv_index: int
    node: str
    bias: bool
    channels: tuple[int, ...] | None  # input channels (depthwise: output channels), magnitude order


def parse_scheme(spec: str, model: Model) -> SparseScheme:
    """Turn a scheme spelling (see module doc) into a validated :class:`SparseScheme` for ``model``."""
    n_convs = len(model.convs())
    if spec == "full":
        scheme = SparseScheme(n_convs, tuple(range(n_convs)), (1.0,) * n_convs, "full")
    elif spec.startswith("paper-"):
        table = PAPER_SCHEMES.get(model.name)
        if table is None:
            raise TinyTrainError(f"scheme {spec!r}: published schemes exist only for {sorted(PAPER_SCHEMES)}, not model {model.name!r}")
        label = spec[len("paper-"):]
        if label not in table:
            raise TinyTrainError(f"scheme {spec!r}: unknown label for {model.name}; known: {', '.join('paper-' + k for k in table)}")
        n_bias, idx, ratio = table[label]
        kept = [(i, r) for i, r in zip(idx, ratio) if r > 0]
        scheme = SparseScheme(n_bias, tuple(i for i, _ in kept), tuple(float(r) for _, r in kept), spec)
    elif spec.startswith(("bias-only:", "last-k:")):
        kind, _, num = spec.partition(":")
        try:
            n = int(num)
        except ValueError:
            raise TinyTrainError(f"scheme {spec!r}: N must be an integer, got {num!r}") from None
        if kind == "bias-only":
            scheme = SparseScheme(n, (), (), spec)
        else:
            scheme = SparseScheme(n, tuple(range(n_convs - n, n_convs)), (1.0,) * n, spec)
    elif spec.endswith(".json") or Path(spec).is_file():
        scheme = _scheme_from_json(spec)
    else:
        raise TinyTrainError(f"unknown scheme {spec!r}; expected paper-<label>, full, bias-only:N, last-k:N or a .json file")
    validate_scheme(scheme, model)
    return scheme


SCHEME_FIELDS = ("n_bias_update", "weight_idx", "weight_ratio")
# What ``tinytrain search`` writes beside a scheme's fields, so its output is a scheme file too.
SEARCH_RECORD_FIELDS = ("predicted_gain", "baseline_accuracy", "validation_accuracy", "peak_sram_bytes", "budget_bytes", "model",
                        "settings", "measured", "contributions")


# A scheme field's element types, and what to call them in an error.
_ELEMENT_TYPES = {"n_bias_update": ((int, np.integer), "an integer"), "weight_idx": ((int, np.integer), "an integer"),
                  "weight_ratio": ((int, float, np.integer, np.floating), "a number")}


def _mistyped(fields: dict) -> str | None:
    """What is wrong with the first element of ``fields`` (name -> values) of a type its field does not take."""
    for key, values in fields.items():
        types, what = _ELEMENT_TYPES[key]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, types):
                return f"field '{key}' has {repr(v)[:40]}, not {what}"
    return None


def _scheme_from_json(path: str) -> SparseScheme:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TinyTrainError(f"scheme file {path}: not found") from None
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise TinyTrainError(f"scheme file {path}: not valid JSON: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise TinyTrainError(f"scheme file {path}: must hold a JSON object")
    unknown = sorted(set(data) - set(SCHEME_FIELDS) - set(SEARCH_RECORD_FIELDS))
    if unknown:
        raise TinyTrainError(f"scheme file {path}: unknown field {unknown[0]!r}; a scheme has {', '.join(SCHEME_FIELDS)}")
    for key, typ in (("n_bias_update", int), ("weight_idx", list), ("weight_ratio", list)):
        if key not in data:
            raise TinyTrainError(f"scheme file {path}: missing field '{key}'")
        if not isinstance(data[key], typ) or isinstance(data[key], bool):
            raise TinyTrainError(f"scheme file {path}: field '{key}' must be {typ.__name__}")
    # Checked before int() and float() build the scheme, which would cut 2.7 to 2.
    bad = _mistyped({key: data[key] for key in ("weight_idx", "weight_ratio")})
    if bad:
        raise TinyTrainError(f"scheme file {path}: {bad}")
    return SparseScheme(data["n_bias_update"], tuple(int(i) for i in data["weight_idx"]),
                        tuple(float(r) for r in data["weight_ratio"]), Path(path).stem)


def validate_scheme(scheme: SparseScheme, model: Model) -> None:
    n_convs = len(model.convs())
    if not isinstance(scheme, SparseScheme):
        raise TinyTrainError(f"scheme {scheme!r}: expected a SparseScheme or a scheme spelling")
    bad = _mistyped({"n_bias_update": [scheme.n_bias_update], "weight_idx": scheme.weight_idx, "weight_ratio": scheme.weight_ratio})
    if bad:
        raise TinyTrainError(f"scheme {scheme.name!r}: {bad}")
    if not 0 <= scheme.n_bias_update <= n_convs:
        raise TinyTrainError(f"scheme {scheme.name!r}: field 'n_bias_update' = {scheme.n_bias_update} must be in [0, {n_convs}] for {model.name}")
    if len(scheme.weight_idx) != len(scheme.weight_ratio):
        raise TinyTrainError(f"scheme {scheme.name!r}: fields 'weight_idx' ({len(scheme.weight_idx)}) and 'weight_ratio' "
                             f"({len(scheme.weight_ratio)}) must have the same length")
    if len(set(scheme.weight_idx)) != len(scheme.weight_idx):
        raise TinyTrainError(f"scheme {scheme.name!r}: field 'weight_idx' lists a conv twice: {list(scheme.weight_idx)}")
    for i, r in zip(scheme.weight_idx, scheme.weight_ratio):
        if not 0 <= i < n_convs:
            raise TinyTrainError(f"scheme {scheme.name!r}: field 'weight_idx' has conv index {i}, out of range [0, {n_convs - 1}] for {model.name}")
        if not 0.0 < r <= 1.0:
            raise TinyTrainError(f"scheme {scheme.name!r}: field 'weight_ratio' for conv {i} is {r}, must be in (0, 1]")


def selected_channels(conv: Conv2D, ratio: float) -> tuple[int, ...]:
    """The ``ratio`` share of channels with the largest weight magnitude (sum of |w|), at least one.

    Input channels for a regular conv, output channels for a depthwise conv;
    ties go to the lower index so the choice is deterministic.
    """
    w = np.abs(conv.weight.astype(np.int64))
    mag = w.sum(axis=(1, 2, 3)) if conv.depthwise else w.sum(axis=(0, 2, 3))
    k = max(1, int(round(ratio * len(mag))))
    order = np.lexsort((np.arange(len(mag)), -mag))
    return tuple(int(c) for c in order[:k])


def layer_updates(scheme: SparseScheme, model: Model) -> list[LayerUpdate]:
    """Per-conv training plan of a validated scheme, in conv order (frozen convs included)."""
    convs = model.convs()
    ratios = dict(zip(scheme.weight_idx, scheme.weight_ratio))
    first_bias = len(convs) - scheme.n_bias_update
    return [
        LayerUpdate(i, c.name, i >= first_bias, selected_channels(c, ratios[i]) if i in ratios else None)
        for i, c in enumerate(convs)
    ]
