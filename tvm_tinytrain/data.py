"""Training data the project can use without downloads: scikit-learn's digits, or a user's .npz.

Images are returned as the model consumes them: int8 NCHW (``pixel - 128``).
"""

from __future__ import annotations

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


def load_npz(path: str | Path, input_shape: tuple[int, ...], num_classes: int):
    """``images`` int8 (N, C, H, W) and ``labels`` (N,) from a .npz, checked against the model; optional ``test_*``."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise TinyTrainError(f"{path}: cannot read data (.npz): {err}") from None
    out = []
    for prefix in ("", "test_"):
        if f"{prefix}images" not in data and prefix:
            out += [None, None]
            continue
        for key in (f"{prefix}images", f"{prefix}labels"):
            if key not in data:
                raise TinyTrainError(f"{path}: missing array '{key}'")
        x, y = data[f"{prefix}images"], data[f"{prefix}labels"]
        if x.dtype != np.int8 or x.shape[1:] != tuple(input_shape):
            raise ShapeError(f"{path}: '{prefix}images' must be int8 (N, {', '.join(map(str, input_shape))}), got {x.dtype} {x.shape}")
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise ShapeError(f"{path}: '{prefix}labels' must be integers of shape ({len(x)},), got {y.dtype} {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise TinyTrainError(f"{path}: '{prefix}labels' must be in [0, {num_classes - 1}], found {int(y.min())}..{int(y.max())}")
        out += [x, y.astype(np.int64)]
    return tuple(out)


def load_data(spec: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0):
    """``digits`` or a path to a .npz: returns (train_x, train_y, test_x, test_y)."""
    if spec == "digits":
        if num_classes < 10:
            raise TinyTrainError(f"data 'digits' has 10 classes; the head has only {num_classes}")
        return digits(tuple(input_shape[1:]), input_shape[0], seed)
    return load_npz(spec, input_shape, num_classes)
