"""``make demo`` / ``tinytrain demo``: the main job on the default model and data.

Until the training issues land this is the inference pipeline end to end:
model -> int8 Relax graph -> TVM (llvm) -> run, checked byte for byte against
the numpy reference.  It needs nothing outside the repository: a small CNN is
built in code (fp32 ONNX), quantized with scikit-learn's digits as
calibration data; the paper's models are used too when ``../shared/models``
(or ``$TINYTRAIN_PAPER_MODELS``) holds them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .ops import reference
from .preprocess import image_to_int8, imagenet_class_names
from .runtime import CompiledModel

PAPER_MODELS = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3")


def digits_as_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as float32 (N, 3, size, size) in [-1, 1], and labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = [np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR)) for im in d.images]
    x = np.stack(imgs).astype(np.float32) / 127.5 - 1.0
    return np.repeat(x[:, None], 3, axis=1), d.target


def paper_models_dir() -> Path:
    env = os.environ.get("TINYTRAIN_PAPER_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "models"


def _builtin_model_demo() -> None:
    from .importers.onnx_import import load_onnx
    from .importers.onnx_testing import float_forward, make_fp32_cnn

    x, _ = digits_as_images(32)
    proto = make_fp32_cnn(seed=0, input_shape=(3, 32, 32), num_classes=10)
    t = time.time()
    model = load_onnx(proto, calibration=x[:256], name="builtin-cnn")
    compiled = CompiledModel(model, batch=1)
    print(f"built-in CNN (random weights, fp32 ONNX -> PTQ int8 with 256 digits): "
          f"{len(model.convs())} convs, {model.macs() / 1e6:.2f} M MACs, compiled in {time.time() - t:.1f} s")
    xq = model.input_info.quant
    test = x[256:320]
    q = np.clip(np.round(test / xq.scale) + xq.zero_point, -128, 127).astype(np.int8)
    exact = all(np.array_equal(compiled(q[i:i + 1]), reference.run_model(model, q[i:i + 1])) for i in range(len(q)))
    lq = model.output_info.quant
    int8_logits = (reference.run_model(model, q).astype(np.float32) - lq.zero_point) * lq.scale
    fp32_logits = float_forward(proto, test)
    err = np.abs(int8_logits - fp32_logits).mean() / np.abs(fp32_logits).mean()
    print(f"  TVM == numpy reference on {len(q)} digits: {exact}; int8 vs fp32 logits: mean relative error {err:.1%}")


def _paper_models_demo(folder: Path) -> None:
    from sklearn.datasets import load_sample_image

    from .importers.paper_pkl import load_paper_model

    names = imagenet_class_names()
    images = {f: image_to_int8(load_sample_image(f), (128, 128))[None] for f in ("flower.jpg", "china.jpg")}
    for name in PAPER_MODELS:
        path = folder / f"{name}.pkl"
        if not path.exists():
            print(f"{path}: not present, skipped")
            continue
        model = load_paper_model(path)
        compiled = CompiledModel(model)
        for img, x in images.items():
            logits = compiled(x)[0]
            exact = np.array_equal(logits, reference.run_model(model, x)[0])
            top = np.argsort(-logits.astype(int), kind="stable")[:3]
            print(f"{name:15s} {img:11s} top-3: {', '.join(names[i] for i in top):55s} TVM == reference: {exact}")


def run_demo(args=None) -> int:
    _builtin_model_demo()
    _paper_models_demo(paper_models_dir())
    return 0
