"""Training data the project can use without downloads: scikit-learn's digits, or a user's .npz.

``digits:5-9`` (or ``digits:5,7,9``) keeps only those digits, renumbered
``0..k-1`` in the order given: the default model's target task as a data
spec, so every subcommand can adapt it without a helper file.

Images are returned as the model consumes them: int8 NCHW (``pixel - 128``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import ShapeError, TinyTrainError


def digits(size: tuple[int, int], channels: int = 3, seed: int = 0, test_fraction: float = 0.25):
    """scikit-learn's 8x8 digits resized to ``size``, grey replicated to ``channels``; a seeded train/test split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.stack([np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((size[1], size[0]), Image.BILINEAR))
                     for im in d.images])
    x = np.repeat((imgs.astype(np.int16) - 128).astype(np.int8)[:, None], channels, axis=1)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], d.target[train].astype(np.int64), x[test], d.target[test].astype(np.int64)


def pick_classes(x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]):
    """The samples of ``classes`` only, labels renumbered ``0..len(classes)-1`` in ``classes`` order."""
    lookup = np.full(max(int(y.max(initial=0)), *classes) + 1, -1)
    lookup[list(classes)] = np.arange(len(classes))
    keep = lookup[y] >= 0
    return x[keep], lookup[y[keep]].astype(np.int64)


def _digit_classes(spec: str) -> tuple[int, ...]:
    """``5-9`` -> (5, 6, 7, 8, 9); ``1,3`` -> (1, 3); an error naming the spec otherwise."""
    text = spec.partition(":")[2]
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-"))
            classes = tuple(range(lo, hi + 1))
        else:
            classes = tuple(int(t) for t in text.split(","))
    except ValueError:
        classes = ()
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
        raise TinyTrainError(f"data {spec!r}: expected digits:LO-HI or digits:A,B,... with distinct digits 0-9")
    return classes


NPZ_ARRAYS = ("images", "labels", "test_images", "test_labels")


def load_npz(path: str | Path, input_shape: tuple[int, ...], num_classes: int):
    """``images`` int8 (N, C, H, W) and ``labels`` (N,) from a .npz, checked against the model; optional ``test_*``."""
    try:  # the arrays are read when first indexed: a damaged member or an object array fails there
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files if key in NPZ_ARRAYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, MemoryError) as err:
        raise TinyTrainError(f"{path}: cannot read data (.npz): {str(err)[:200] or type(err).__name__}") from None
    out = []
    for prefix in ("", "test_"):
        if f"{prefix}images" not in arrays and prefix:
            out += [None, None]
            continue
        for key in (f"{prefix}images", f"{prefix}labels"):
            if key not in arrays:
                raise TinyTrainError(f"{path}: missing array '{key}'")
        x, y = arrays[f"{prefix}images"], arrays[f"{prefix}labels"]
        if x.dtype != np.int8 or x.shape[1:] != tuple(input_shape):
            raise ShapeError(f"{path}: '{prefix}images' must be int8 (N, {', '.join(map(str, input_shape))}), got {x.dtype} {x.shape}")
        if len(x) == 0:
            raise TinyTrainError(f"{path}: '{prefix}images' holds no images")
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise ShapeError(f"{path}: '{prefix}labels' must be integers of shape ({len(x)},), got {y.dtype} {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise TinyTrainError(f"{path}: '{prefix}labels' must be in [0, {num_classes - 1}], found {int(y.min())}..{int(y.max())}")
        out += [x, y.astype(np.int64)]
    return tuple(out)


def load_data(spec: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0):
    """``digits``, ``digits:<classes>`` or a path to a .npz: returns (train_x, train_y, test_x, test_y)."""
    if spec == "digits" or spec.startswith("digits:"):
        classes = _digit_classes(spec) if spec != "digits" else tuple(range(10))
        if num_classes < len(classes):
            raise TinyTrainError(f"data {spec!r} has {len(classes)} classes; the head has only {num_classes}")
        train_x, train_y, test_x, test_y = digits(tuple(input_shape[1:]), input_shape[0], seed)
        return (*pick_classes(train_x, train_y, classes), *pick_classes(test_x, test_y, classes))
    return load_npz(spec, input_shape, num_classes)
