#!/usr/bin/env python3
"""Sparse update vs bias-only vs last-k: test accuracy against planned peak SRAM (the paper's figure 9 shape).

The default model adapted to digits 5-9 as in ``make demo`` (int8 + QAS,
batch 1, lr 0.02, 2 epochs, new 5-class head), once per scheme and seed:

- ``bias-only:N``: biases of the last N convs (of 13);
- ``last-k:N``: weights and biases of the last N convs (``last-k:13`` = full update);
- sparse: the hand-written schemes in ``scripts/schemes/default-sparse-*.json``,
  biases of the last n convs plus a few weights, some on a share of their
  channels (conv indices: 0 stem, then expand/dw/project of blocks 1-4;
  7-9 = block 3, 10-12 = block 4).

Peak SRAM is the planner's (arena + trainable parameters), the same number
``tinytrain memory`` prints.  Writes ``results/exp_sparse.json`` and ``.png``.

    .venv/bin/python scripts/exp_sparse.py [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tvm_tinytrain.default_model import load_default_model
from tvm_tinytrain.experiments import RESULTS, Arm, adaptation_task, percent, summarize, write_record

LR = 0.02
EPOCHS = 2
SCHEMES_DIR = Path(__file__).resolve().parent / "schemes"
# family -> {label: scheme spelling}
FAMILIES = {
    "bias-only": {f"bias-only:{n}": f"bias-only:{n}" for n in (2, 4, 6, 9, 13)},
    "last-k": {f"last-k:{n}": f"last-k:{n}" for n in (1, 2, 3, 4, 6, 9, 13)},
    "sparse": {p.stem: str(p) for p in sorted(SCHEMES_DIR.glob("default-sparse-*.json"))},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data order and head init")
    ap.add_argument("--quick", action="store_true", help="1 epoch (a smoke run)")
    args = ap.parse_args()
    epochs = 1 if args.quick else EPOCHS
    start = time.perf_counter()
    model, task = load_default_model(), adaptation_task()
    points = []
    for family, schemes in FAMILIES.items():
        for label, scheme in schemes.items():
            arm = Arm("int8+qas", model, task, scheme)
            runs = [arm.run(LR, s, epochs) for s in args.seeds]
            acc = summarize(r["accuracy"] for r in runs)
            for r in runs:
                r["scheme"] = label
            points.append({"family": family, "scheme": label, "peak_sram_bytes": runs[0]["peak_sram_bytes"], "accuracy": acc, "runs": runs})
            print(f"{label:18s} peak {runs[0]['peak_sram_bytes'] / 1024:6.1f} KB  accuracy {acc['mean']:.1%} ± {acc['std']:.1%} "
                  f"(min {acc['min']:.1%}, max {acc['max']:.1%})", flush=True)
    path = write_record("exp_sparse", {"model": model.name, "task": "digits 5-9", "lr": LR, "epochs": epochs, "seeds": args.seeds,
                                       "points": points, "seconds": round(time.perf_counter() - start)})
    _plot(points, RESULTS / "exp_sparse.png", epochs)
    print("\n| family | scheme | planned peak SRAM (KB) | test accuracy % |\n|---|---|---|---|")
    for p in points:
        print(f"| {p['family']} | {p['scheme']} | {p['peak_sram_bytes'] / 1024:.1f} | {percent(p['accuracy'])} |")
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")


def _plot(points, path, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, family in enumerate(FAMILIES):
        pts = sorted((p for p in points if p["family"] == family), key=lambda p: p["peak_sram_bytes"])
        xs = [p["peak_sram_bytes"] / 1024 for p in pts]
        mean = [p["accuracy"]["mean"] for p in pts]
        err = [[p["accuracy"]["mean"] - p["accuracy"]["min"] for p in pts], [p["accuracy"]["max"] - p["accuracy"]["mean"] for p in pts]]
        ax.errorbar(xs, mean, yerr=err, marker="os^"[i], ls="-" if family != "sparse" else "none", capsize=3, label=family, color=f"C{i}")
        for x, y, p in zip(xs, mean, pts):
            ax.annotate(p["scheme"].replace("default-sparse-", "").split(":")[-1], (x, y), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=f"C{i}")
    ax.set_xlabel("planned peak SRAM of one training step (KB)")
    ax.set_ylabel("test accuracy (digits 5-9)")
    ax.set_title(f"default model, int8 + QAS, batch 1, {epochs} epochs: mean and min-max over seeds", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
