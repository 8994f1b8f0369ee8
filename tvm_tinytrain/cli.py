"""The ``tinytrain`` command line."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .errors import TinyTrainError


def _load(args):
    from .importers import load_model

    calib = None
    if getattr(args, "calibration", None):
        try:
            calib = np.load(args.calibration)
        except (OSError, ValueError) as err:
            raise TinyTrainError(f"{args.calibration}: cannot read calibration data (.npy): {err}") from None
    return load_model(args.model, calibration=calib)


def cmd_inspect(args) -> int:
    from .summary import model_summary

    s = model_summary(_load(args))
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"model {s['model']}  input {tuple(s['input'])}")
    print(f"{'#':>3} {'name':<28} {'type':<17} {'output':<16} {'k':>2} {'s':>2} {'MACs':>10} {'params':>8} {'act bytes':>10}")
    for i, r in enumerate(s["layers"]):
        print(f"{i:>3} {r['name']:<28} {r['type']:<17} {str(tuple(r['output'])):<16} {r['kernel'] or '':>2} {r['stride'] or '':>2} "
              f"{r['macs']:>10,} {r['params']:>8,} {r['activation_bytes']:>10,}")
    t = s["totals"]
    print(f"total: {t['convs']} convs, {t['macs'] / 1e6:.2f} M MACs, {t['params']:,} params, "
          f"largest layer activations {t['max_activation_bytes'] / 1024:.1f} KB")
    return 0


def cmd_predict(args) -> int:
    from .preprocess import imagenet_class_names, load_image
    from .runtime import CompiledModel

    model = _load(args)
    _, h, w = model.input_info.shape
    images = [load_image(p, (h, w)) for p in args.images]
    compiled = CompiledModel(model)
    n_out = model.output_info.shape[0]
    names = imagenet_class_names() if n_out == 1000 else None
    results = []
    for path, img in zip(args.images, images):
        logits = compiled(img[None])[0]
        top = np.argsort(-logits.astype(np.float64), kind="stable")[: args.top]
        results.append({
            "image": path,
            "top": [int(i) for i in top],
            "labels": [names[i] for i in top] if names else None,
            "logits": logits.tolist(),
        })
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        labels = r["labels"] or [str(i) for i in r["top"]]
        print(f"{r['image']}: " + ", ".join(f"{i} {lab} ({r['logits'][i]})" for i, lab in zip(r["top"], labels)))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinytrain", description="On-device int8 training under 256 KB, on Apache TVM.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_cmd(name, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("model", help="model file: the paper's .pkl, or .onnx (QDQ int8, or fp32 with --calibration)")
        sp.add_argument("--calibration", help=".npy float32 NCHW batch for quantizing an fp32 ONNX model")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    model_cmd("inspect", "per-layer shapes, MACs, params and activation bytes").set_defaults(func=cmd_inspect)
    sp = model_cmd("predict", "classify images with TVM-compiled int8 inference")
    sp.add_argument("images", nargs="+", help="image files (RGB; centre-cropped and resized to the model input)")
    sp.add_argument("--top", type=int, default=5, help="how many classes to report")
    sp.set_defaults(func=cmd_predict)
    sp = sub.add_parser("demo", help="the main job on the default model and data")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TinyTrainError as err:
        print(f"tinytrain: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
