#!/usr/bin/env python3
"""Host training of a paper model on scikit-learn digits (resized to the model input, new 10-class head).

One epoch, batch 1, the TVM-compiled int8 step (llvm).  Writes results/train_digits_<model>_<scheme>.json
and a loss/accuracy plot.

    .venv/bin/python scripts/train_digits.py [--model mcunet-5fps] [--scheme paper-99kb] [--lr 0.003] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from tvm_tinytrain.data import digits
from tvm_tinytrain.demo import paper_models_dir
from tvm_tinytrain.importers.paper_pkl import load_paper_model
from tvm_tinytrain.trainer import Int8Trainer

OUT = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mcunet-5fps")
    ap.add_argument("--scheme", default="paper-99kb")
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = load_paper_model(paper_models_dir() / f"{args.model}.pkl")
    t0 = time.time()
    trainer = Int8Trainer(model, args.scheme, num_classes=10, lr=args.lr, head_seed=args.seed)
    compile_s = time.time() - t0
    x, y, tx, ty = digits(model.input_info.shape[1:], model.input_info.shape[0], args.seed)
    log = {"model": args.model, "scheme": args.scheme, "lr": args.lr, "train_images": len(y), "test_images": len(ty),
           "compile_seconds": round(compile_s, 1), "accuracy_before": trainer.evaluate(tx, ty), "curve": [],
           "machine": f"{platform.node()} {platform.machine()}", "command": "python scripts/train_digits.py " + " ".join(
               f"--{k} {v}" for k, v in vars(args).items())}
    print(f"accuracy before: {log['accuracy_before']:.1%}", flush=True)
    rng = np.random.default_rng(args.seed)
    losses, t1 = [], time.time()
    for epoch in range(args.epochs):
        for i, k in enumerate(rng.permutation(len(y))):
            losses.append(trainer.step(x[k], int(y[k])))
            if (i + 1) % 250 == 0:
                acc = trainer.evaluate(tx, ty)
                log["curve"].append({"step": len(losses), "mean_loss_last_250": float(np.mean(losses[-250:])), "accuracy": acc})
                print(f"step {len(losses)}: loss {np.mean(losses[-250:]):.3f}, test accuracy {acc:.1%}", flush=True)
    log["seconds_per_step"] = round((time.time() - t1) / len(losses), 4)
    log["accuracy_after"] = trainer.evaluate(tx, ty)
    log["peak_sram_bytes"] = trainer.memory_plan().peak_sram_bytes
    print(f"accuracy after {args.epochs} epoch(s): {log['accuracy_after']:.1%}")
    OUT.mkdir(exist_ok=True)
    stem = f"train_digits_{args.model}_{args.scheme}"
    (OUT / f"{stem}.json").write_text(json.dumps(log, indent=1))
    _plot(log, OUT / f"{stem}.png")


def _plot(log, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [0] + [c["step"] for c in log["curve"]]
    accs = [log["accuracy_before"]] + [c["accuracy"] for c in log["curve"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, accs, marker="o")
    ax.axhline(0.1, color="gray", ls=":", label="chance")
    ax.set_xlabel("training steps (batch 1)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{log['model']} {log['scheme']} on digits, int8 + QAS (host, TVM llvm)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
