#!/usr/bin/env python3
"""Reproduce the shipped default model: float32 pre-training on digits 0-4, then int8 PTQ (see tvm_tinytrain/default_model.py).

Writes the QDQ ONNX file (default: the shipped tvm_tinytrain/data/default_model.onnx) and
results/pretrain_default_model.json with the source test accuracy of the float and the int8 model,
the timing, the machine and the command.  The same seed gives the same bytes on the same machine.

    .venv/bin/python scripts/pretrain_default_model.py --seed 0 [--out tvm_tinytrain/data/default_model.onnx]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from tvm_tinytrain import default_model as dm
from tvm_tinytrain.importers.onnx_import import load_onnx
from tvm_tinytrain.importers.onnx_testing import float_forward
from tvm_tinytrain.ops import reference

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=dm.DEFAULT_MODEL_PATH, help="the QDQ ONNX file to write")
    args = ap.parse_args()
    schedule = dm.Schedule()
    source = dm.task(dm.SOURCE_CLASSES)
    start = time.perf_counter()
    fp32 = dm.pretrain_float(args.seed, schedule, source)
    train_s = time.perf_counter() - start
    qdq = dm.quantize(fp32, source)
    total_s = time.perf_counter() - start
    onnx.save(qdq, str(args.out))
    float_acc = float(np.mean(float_forward(fp32, dm.as_float(source.test_x)).argmax(axis=1) == source.test_y))
    model = load_onnx(str(args.out))
    int8_acc = float(np.mean(reference.run_model(model, source.test_x).argmax(axis=1) == source.test_y))
    blob = args.out.read_bytes()
    log = {
        "seed": args.seed, "schedule": vars(schedule), "source_classes": list(dm.SOURCE_CLASSES),
        "train_images": len(source.train_y), "test_images": len(source.test_y), "macs": model.macs(),
        "source_test_accuracy_float": float_acc, "source_test_accuracy_int8": int8_acc,
        "float_training_seconds": round(train_s, 1), "total_seconds": round(total_s, 1),
        "onnx": os.path.relpath(args.out.resolve(), RESULTS.parent), "onnx_bytes": len(blob), "onnx_sha256": hashlib.sha256(blob).hexdigest(),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": "python scripts/pretrain_default_model.py " + " ".join(sys.argv[1:]),
    }
    print(f"{args.out}: {len(blob) / 1024:.1f} KB, {model.macs() / 1e6:.2f} M MACs; source (digits {dm.SOURCE_CLASSES}) test accuracy: "
          f"float {float_acc:.1%}, int8 {int8_acc:.1%} on {len(source.test_y)} images; {total_s:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pretrain_default_model.json").write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
