#!/usr/bin/env python3
"""Batch 1 with and without gradient accumulation, on the default model's adaptation task.

The default model adapted to digits 5-9 as in ``make demo`` (scheme
``last-k:6``, int8 + QAS, batch 1, 2 epochs: every arm sees the same images
in the same order).  Accumulating B images sums their float32 gradients and
applies the mean once, so it makes B times fewer updates; each B > 1 runs at
the demo's lr and at B times it (the linear scaling rule: the same step per
image as without accumulation), and at the demo's lr for 2B epochs (as many
updates as without accumulation, B times the images).  Peak SRAM is the planner's for the step the
arm runs (``accumulate_step`` holds 4-byte accumulators for every trained
value).  Writes ``results/exp_accumulate.json`` and ``.png``.

    .venv/bin/python scripts/exp_accumulate.py [--seeds 0 1 2] [--accumulate 1 4 8] [--quick]
"""

from __future__ import annotations

import argparse
import time

from tvm_tinytrain.default_model import load_default_model
from tvm_tinytrain.experiments import RESULTS, Arm, adaptation_task, percent, summarize, write_record
from tvm_tinytrain.plots import plot_grouped_bars

SCHEME = "last-k:6"
LR = 0.02
EPOCHS = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data order and head init")
    ap.add_argument("--accumulate", type=int, nargs="+", default=[1, 4, 8], help="images per update")
    ap.add_argument("--quick", action="store_true", help="1 epoch (a smoke run)")
    args = ap.parse_args()
    epochs = 1 if args.quick else EPOCHS
    start = time.perf_counter()
    model, task = load_default_model(), adaptation_task()
    arms = []
    for b in args.accumulate:
        arm = Arm("int8+qas", model, task, SCHEME, accumulate=b)
        for lr, n_epochs in dict.fromkeys([(LR, epochs), (round(LR * b, 9), epochs), (LR, epochs * b)]):
            runs = [arm.run(lr, s, n_epochs) for s in args.seeds]
            acc = summarize(r["accuracy"] for r in runs)
            arms.append({"accumulate": b, "lr": lr, "epochs": n_epochs, "updates": -(-len(task.train_y) // b) * n_epochs,
                         "peak_sram_bytes": runs[0]["peak_sram_bytes"], "accuracy": acc, "runs": runs})
            print(f"accumulate {b}, lr {lr:g}, {n_epochs} epochs: {arms[-1]['updates']} updates, peak {arms[-1]['peak_sram_bytes'] / 1024:.1f} KB, "
                  f"accuracy {acc['mean']:.1%} ± {acc['std']:.1%} (min {acc['min']:.1%}, max {acc['max']:.1%})", flush=True)
    path = write_record("exp_accumulate", {"model": model.name, "task": "digits 5-9", "scheme": SCHEME, "seeds": args.seeds,
                                           "arms": arms, "seconds": round(time.perf_counter() - start)})
    groups = {}
    for a in arms:
        series = f"lr {LR:g} x B" if a["lr"] != LR else f"lr {LR:g}, {epochs} epochs x B" if a["epochs"] != epochs else f"lr {LR:g}"
        groups.setdefault(f"B = {a['accumulate']}\n{a['peak_sram_bytes'] / 1024:.0f} KB", {})[series] = a["accuracy"]["values"]
    plot_grouped_bars(groups, RESULTS / "exp_accumulate.png",
                      f"default model, {SCHEME}, int8 + QAS, batch 1: accumulating B gradients per update", "test accuracy")
    print("\n| accumulate B | lr | epochs | updates | planned peak SRAM (KB) | test accuracy % |\n|---|---|---|---|---|---|")
    for a in arms:
        print(f"| {a['accumulate']} | {a['lr']:g} | {a['epochs']} | {a['updates']} | {a['peak_sram_bytes'] / 1024:.1f} | {percent(a['accuracy'])} |")
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
