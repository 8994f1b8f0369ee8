#!/usr/bin/env python3
"""Batch 1 with and without gradient accumulation, on the default model's adaptation task.

The default model adapted to digits 5-9 as in ``make demo`` (scheme
``last-k:6``, int8 + QAS, batch 1, lr 0.02, 2 epochs; every run of a seed
sees the images in the same order).  Accumulating B images sums their
float32 gradients and applies the mean once, so in the same epochs it makes
B times fewer updates.  Each B > 1 runs for 2 epochs at lr 0.02 and at
lr 0.02 x B (the linear scaling rule: the same step per image), and for 2B
epochs at lr 0.02 (as many updates as batch 1 in 2 epochs); batch 1 without
accumulation also runs for 2B epochs, the same images as that last arm.
Peak SRAM is the planner's for the step each arm runs (``accumulate_step``
holds 4-byte accumulators for every trained value).  Writes
``results/exp_accumulate.json`` and ``.png``.

    .venv/bin/python scripts/exp_accumulate.py [--seeds 0 1 2] [--accumulate 1 4 8] [--quick]
"""

from __future__ import annotations

import argparse
import time

from tvm_tinytrain.default_model import load_default_model
from tvm_tinytrain.experiments import RESULTS, Arm, adaptation_task, percent, summarize, write_record

SCHEME = "last-k:6"
LR = 0.02
EPOCHS = 2


def settings(b: int, all_b, epochs: int) -> list[tuple[float, int]]:
    """(lr, epochs) of the runs of accumulation ``b`` (see module doc)."""
    if b == 1:
        return [(LR, epochs * k) for k in sorted(set(all_b) | {1})]
    return [(LR, epochs), (round(LR * b, 9), epochs), (LR, epochs * b)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data order and head init")
    ap.add_argument("--accumulate", type=int, nargs="+", default=[1, 4, 8], help="images per update")
    ap.add_argument("--quick", action="store_true", help="1 epoch as the base (a smoke run)")
    args = ap.parse_args()
    epochs = 1 if args.quick else EPOCHS
    start = time.perf_counter()
    model, task = load_default_model(), adaptation_task()
    arms = []
    for b in args.accumulate:
        arm = Arm("int8+qas", model, task, SCHEME, accumulate=b)
        for lr, n_epochs in settings(b, args.accumulate, epochs):
            runs = [arm.run(lr, s, n_epochs) for s in args.seeds]
            acc = summarize(r["accuracy"] for r in runs)
            plan = {k: runs[0][k] for k in ("peak_sram_bytes", "arena_bytes", "trainable_param_bytes")}
            arms.append({"accumulate": b, "lr": lr, "epochs": n_epochs, "updates": -(-len(task.train_y) * n_epochs // b), **plan,
                         "accuracy": acc, "runs": runs})
            print(f"accumulate {b}, lr {lr:g}, {n_epochs} epochs: {arms[-1]['updates']} updates, peak {plan['peak_sram_bytes'] / 1024:.1f} KB, "
                  f"accuracy {acc['mean']:.1%} ± {acc['std']:.1%} (min {acc['min']:.1%}, max {acc['max']:.1%})", flush=True)
    path = write_record("exp_accumulate", {"model": model.name, "task": "digits 5-9", "scheme": SCHEME, "seeds": args.seeds,
                                           "arms": arms, "seconds": round(time.perf_counter() - start)})
    _plot(arms, RESULTS / "exp_accumulate.png")
    print("\n| accumulate B | lr | epochs | updates | planned peak SRAM (KB): arena + trainable | test accuracy % |\n|---|---|---|---|---|---|")
    for a in arms:
        print(f"| {a['accumulate']} | {a['lr']:g} | {a['epochs']} | {a['updates']} | {a['peak_sram_bytes'] / 1024:.1f}: "
              f"{a['arena_bytes'] / 1024:.1f} + {a['trainable_param_bytes'] / 1024:.1f} | {percent(a['accuracy'])} |")
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")


def _plot(arms, path) -> None:
    """Accuracy against epochs (images seen), one line per B at lr 0.02; lr x B as open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, b in enumerate(dict.fromkeys(a["accumulate"] for a in arms)):
        for scaled in (False, True):
            pts = sorted((a for a in arms if a["accumulate"] == b and (a["lr"] != LR) == scaled), key=lambda a: a["epochs"])
            if not pts:
                continue
            xs = [a["epochs"] * (1.04 if scaled else 1) for a in pts]
            mean = [a["accuracy"]["mean"] for a in pts]
            err = [[a["accuracy"]["mean"] - a["accuracy"]["min"] for a in pts], [a["accuracy"]["max"] - a["accuracy"]["mean"] for a in pts]]
            label = f"B = {b}, lr {pts[0]['lr']:g}" + (" (x B)" if scaled else "") + f", {pts[0]['peak_sram_bytes'] / 1024:.0f} KB"
            ax.errorbar(xs, mean, yerr=err, marker="o", ls="none" if scaled else "-", mfc="none" if scaled else f"C{i}", capsize=3,
                        color=f"C{i}", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epochs (images seen / training images)")
    ax.set_ylabel("test accuracy (digits 5-9)")
    ax.set_title(f"default model, {SCHEME}, int8 + QAS, batch 1, B gradients accumulated per update: mean and min-max over seeds", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
