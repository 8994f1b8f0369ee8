#!/usr/bin/env python3
"""Searched scheme vs the best bias-only:N and last-k:N that fit the same budget, on the default model's adaptation task.

For each budget: ``tinytrain search`` (contribution analysis on a validation
split of the digits 5-9 train data with the same epochs and lr, shared
cache; the three best fitting combinations measured there), then every scheme (the
searched one, and each bias-only:N / last-k:N whose exact peak fits) is
fine-tuned on the whole train split with the demo's settings (lr 0.02, 2
epochs, batch 1, QAS) over several data orders, and scored on the test split.
Writes results/search_scheme.json and results/search_scheme.png.

    .venv/bin/python scripts/search_scheme.py [--budgets 100KB,50KB] [--seeds 3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tvm_tinytrain.cli import main as tinytrain
from tvm_tinytrain.cli import parse_bytes
from tvm_tinytrain.default_model import DEFAULT_MODEL_PATH, TARGET_CLASSES, load_default_model
from tvm_tinytrain.demo import EPOCHS, LR
from tvm_tinytrain.search import accuracy_over_orders

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results"
DATA = "digits:5-9"
CLASSES = len(TARGET_CLASSES)


def train(scheme: str, seeds: int, epochs: int, lr: float) -> dict:
    """Test accuracy of ``scheme`` after ``epochs`` over the train split, one data order per seed (one compile, parameters reset)."""
    from tvm_tinytrain.data import load_data
    from tvm_tinytrain.trainer import Int8Trainer

    model = load_default_model()
    x, y, tx, ty = load_data(DATA, model.input_info.shape, CLASSES)
    trainer = Int8Trainer(model, str(ROOT / scheme) if scheme.endswith(".json") else scheme, CLASSES, lr=lr)
    accs = accuracy_over_orders(trainer, (x, y), (tx, ty), epochs, range(seeds))
    return {"scheme": scheme, "peak_sram_bytes": trainer.memory_plan().peak_sram_bytes, "accuracies": accs,
            "mean": float(np.mean(accs)), "std": float(np.std(accs))}


def peak(model, scheme: str) -> int:
    from relax_passes import memory_plan
    from tvm_tinytrain.trainer import build_training_module

    return memory_plan(build_training_module(model, scheme, CLASSES)).peak_sram_bytes


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for family, marker in (("bias-only", "o"), ("last-k", "s")):
        pts = sorted((r["peak_sram_bytes"] / 1024, r["mean"] * 100, r["std"] * 100) for k, r in runs.items() if k.startswith(family))
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], marker=marker, capsize=2, label=f"{family}:N")
    for label, b in report["budgets"].items():
        s = runs[b["searched"]["file"]]
        ax.errorbar([s["peak_sram_bytes"] / 1024], [s["mean"] * 100], [s["std"] * 100], marker="*", ms=14, ls="", capsize=2,
                    label=f"searched, budget {label}")
        ax.axvline(b["budget_bytes"] / 1024, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("exact peak SRAM of one training step (KB)")
    ax.set_ylabel(f"test accuracy after {report['epochs']} epochs (%)")
    ax.set_title(f"default model, digits {TARGET_CLASSES[0]}-{TARGET_CLASSES[-1]}: mean ± std over {report['seeds']} data orders")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="100KB,50KB")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--repeats", type=int, default=3, help="data orders per candidate in the contribution analysis")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", default=str(ROOT / "out" / "search_scheme.cache"))
    args = ap.parse_args()
    start = time.time()
    model = load_default_model()
    n_convs = len(model.convs())
    peaks = {s: peak(model, s) for s in [f"bias-only:{n}" for n in range(n_convs + 1)] + [f"last-k:{n}" for n in range(1, n_convs + 1)]}
    budgets, wanted = {}, set()
    for label in args.budgets.split(","):
        budget = parse_bytes(label)
        out = f"results/search_scheme_{label}.json"
        argv = ["search", "tvm_tinytrain/data/default_model.onnx", "--data", DATA, "--num-classes", str(CLASSES), "--lr", str(args.lr),
                "--epochs", str(args.epochs), "--repeats", str(args.repeats), "--budget", label, "-o", out, "--jobs", str(args.jobs)]
        t = time.time()
        if tinytrain([str(ROOT / a) if a.startswith(("results/", "tvm_tinytrain/")) else a for a in argv] + ["--cache", args.cache]) != 0:
            sys.exit(f"search for {label} failed")
        record = json.loads((ROOT / out).read_text())
        keys = ("n_bias_update", "weight_idx", "weight_ratio", "predicted_gain", "baseline_accuracy", "validation_accuracy", "peak_sram_bytes", "measured")
        fits = [s for s, p in peaks.items() if p <= budget]
        budgets[label] = {"budget_bytes": budget, "search_seconds": round(time.time() - t), "command": "tinytrain " + " ".join(argv),
                          "searched": {"file": out, **{k: record[k] for k in keys}}, "fitting": fits}
        wanted |= {out} | set(fits)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        runs = dict(zip(sorted(wanted), pool.map(train, sorted(wanted), *[[v] * len(wanted) for v in (args.seeds, args.epochs, args.lr)])))
    for label, b in budgets.items():
        for family in ("bias-only", "last-k"):
            best = max((s for s in b["fitting"] if s.startswith(family)), key=lambda s: runs[s]["mean"], default=None)
            b[f"best_{family}"] = {"scheme": best, **runs[best]} if best else None
        b["searched"].update({k: runs[b["searched"]["file"]][k] for k in ("accuracies", "mean", "std")})
    report = {"machine": f"{platform.node()} {platform.machine()} ({multiprocessing.cpu_count()} CPUs)",
              "command": "python scripts/search_scheme.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "cache"),
              "model": DEFAULT_MODEL_PATH.name, "data": DATA, "epochs": args.epochs, "lr": args.lr, "seeds": args.seeds,
              "budgets": budgets, "runs": runs, "seconds": round(time.time() - start)}
    OUT.mkdir(exist_ok=True)
    (OUT / "search_scheme.json").write_text(json.dumps(report, indent=1))
    plot(report, OUT / "search_scheme.png")
    for label, b in budgets.items():
        s = b["searched"]
        print(f"budget {label}: searched {s['mean']:.1%} ± {s['std']:.1%} ({s['peak_sram_bytes'] / 1024:.1f} KB); " + "; ".join(
            f"best {f} {b[f'best_{f}']['scheme']} {b[f'best_{f}']['mean']:.1%} ± {b[f'best_{f}']['std']:.1%} "
            f"({b[f'best_{f}']['peak_sram_bytes'] / 1024:.1f} KB)" for f in ("bias-only", "last-k") if b[f"best_{f}"]))


if __name__ == "__main__":
    main()
