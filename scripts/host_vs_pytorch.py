#!/usr/bin/env python3
"""Host time of one training step (batch 1): our int8 step (TVM llvm, reference and optimized kernels) vs PyTorch.

PyTorch runs the float32 (dequantized) version of the same model with the same new head, the clamps as
activations, and SGD on the same parameters (whole tensors: PyTorch has no per-channel sparse update, so for
a partially trained weight it computes the gradient of every channel, which favours us a little).  PyTorch is
optional: ``pip install torch==2.13.0`` (the CPU build); without it the PyTorch column is left out.
Writes results/host_vs_pytorch.json and results/host_vs_pytorch.md.

    .venv/bin/python scripts/host_vs_pytorch.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tvm_tinytrain.demo import paper_models_dir
from tvm_tinytrain.experiments import float_trainable
from tvm_tinytrain.float_mode import clamp_range, float_params, real_input, split_head
from tvm_tinytrain.importers.paper_pkl import load_paper_model
from tvm_tinytrain.model import Add, Conv2D
from tvm_tinytrain.relax_build import param_name
from tvm_tinytrain.trainer import Int8Trainer

CASES = [("mcunet-5fps", "paper-99kb"), ("mbv2-w0.35", "paper-99kb"), ("proxyless-w0.3", "paper-98kb")]
OUT = Path(__file__).resolve().parents[1] / "results"


def median_ms(step, images, labels, steps: int) -> float:
    step(images[0], labels[0])  # warm-up (first-call allocations)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(images[i % len(images)], labels[i % len(labels)])
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 2)


def torch_step(model, scheme: str, num_classes: int, threads: int):
    """A PyTorch float32 training step of the dequantized model; None when PyTorch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    body, head = split_head(model)
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in float_params(model, num_classes).items()}
    trainable = set(float_trainable(model, scheme, whole_slices=True))
    for k, p in params.items():
        p.requires_grad_(k in trainable)
    opt = torch.optim.SGD([p for k, p in params.items() if k in trainable], lr=0.01)

    def forward(x):
        values = {model.input: x}
        for node in body:
            if isinstance(node, Conv2D):
                y = torch.nn.functional.conv2d(values[node.input], params[param_name(node.name, "weight")],
                                               params[param_name(node.name, "bias")], node.stride, node.padding, 1, node.groups)
                values[node.output] = torch.clamp(y, *clamp_range(model, node))
            elif isinstance(node, Add):
                values[node.output] = torch.clamp(values[node.lhs] + values[node.rhs], *clamp_range(model, node))
            else:
                values[node.output] = values[node.input].mean(dim=(2, 3))
        return values[head.input] @ params[param_name(head.name, "weight")].T + params[param_name(head.name, "bias")]

    def step(image, label):
        x = torch.from_numpy(real_input(model, image[None]))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(x), torch.tensor([int(label)]))
        loss.backward()
        opt.step()

    return step


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name, scheme in CASES:
        path = paper_models_dir() / f"{name}.pkl"
        if not path.exists():
            print(f"{name}: model file missing; set TINYTRAIN_PAPER_MODELS", file=sys.stderr)
            return 2
        model = load_paper_model(path)
        images = rng.integers(-128, 128, (4, *model.input_info.shape)).astype(np.int8)
        labels = [int(v) for v in rng.integers(0, 10, 4)]
        row = {"model": name, "scheme": scheme}
        for kernels in ("reference", "optimized"):
            trainer = Int8Trainer(model, scheme, num_classes=10, kernels=kernels)
            row[f"tinytrain_{kernels}_ms"] = median_ms(trainer.step, images, labels, args.steps)
        for threads in (1, 2):
            step = torch_step(model, scheme, 10, threads)
            if step is not None:
                row[f"pytorch_{threads}_thread_ms"] = median_ms(step, images, labels, args.steps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    meta = {"machine": f"{platform.node()} {platform.machine()} ({platform.processor() or 'cpu'})", "torch": torch_version,
            "command": "python scripts/host_vs_pytorch.py " + " ".join(sys.argv[1:]), "steps": args.steps, "batch": 1}
    OUT.mkdir(exist_ok=True)
    (OUT / "host_vs_pytorch.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = [k for k in rows[0] if k.endswith("_ms")]
    md = ["| model | scheme | " + " | ".join(c.removesuffix("_ms").replace("_", " ") + " (ms/step)" for c in cols) + " |",
          "|---|---|" + "---|" * len(cols)]
    md += [f"| {r['model']} | {r['scheme']} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    (OUT / "host_vs_pytorch.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
