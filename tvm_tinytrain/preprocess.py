"""Image -> int8 model input, the way the paper's models were fed.

RGB, centre crop to a square, bilinear resize to the model's input size,
``int8 = pixel - 128`` (x_scale 1/127.5, zero 0 in the paper's files), NCHW.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import TinyTrainError


def load_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Read one image file as an int8 (3, H, W) array."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return image_to_int8(np.asarray(im.convert("RGB")), size)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise TinyTrainError(f"{path}: cannot read image: {err}") from None


def image_to_int8(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> int8 (3, h, w): centre crop, bilinear resize, minus 128."""
    from PIL import Image

    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(rgb[top:top + side, left:left + side]))
    resized = np.asarray(crop.resize((size[1], size[0]), Image.BILINEAR), dtype=np.int16)
    return (resized - 128).astype(np.int8).transpose(2, 0, 1).copy()


def imagenet_class_names() -> list[str]:
    text = (Path(__file__).parent / "data" / "imagenet_classes.txt").read_text()
    return text.splitlines()
