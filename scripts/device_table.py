#!/usr/bin/env python3
"""Measured SRAM, flash and instructions per training step of the paper's models on emulated Cortex-M4 and M7.

Builds each model's generated C training step for QEMU mps2-an386 (M4) and mps2-an500 (M7) with the STM32F746's
memory (320 KB RAM, 1 MB flash), once with the reference kernels and once with the optimized ones (the same
bits), runs 3 steps on random data and reports the measured parts beside the planner's prediction and the paper,
plus the instructions spent in each kind of kernel (a TINYTRAIN_PROFILE build).
Writes results/device_table.json and results/device_table.md; with ``--all-schemes`` (every published scheme of
each model instead of the one the paper times) results/device_table_all_schemes.json and .md; with
``--no-fuse-trained-expansion`` (the pass option of FuseDepthwiseBackward, on by default, off) the names end in
``_no_fuse_trained_expansion``.

    .venv/bin/python scripts/device_table.py [--kernels optimized] [--targets qemu-m7] [--all-schemes] [--no-fuse-trained-expansion]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from relax_passes import pass_config
from tvm_tinytrain.boards import build_project, run_project, write_dataset
from tvm_tinytrain.demo import paper_models_dir
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.importers.paper_pkl import load_paper_model
from tvm_tinytrain.scheme import PAPER_SCHEMES

CASES = [("mcunet-5fps", "paper-99kb"), ("mbv2-w0.35", "paper-99kb"), ("proxyless-w0.3", "paper-98kb")]
PAPER = {"mcunet-5fps": "173 KB, 546 ms (118 M cycles)", "mbv2-w0.35": "141 KB, 373 ms", "proxyless-w0.3": "135 KB, 443 ms"}
OUT = Path(__file__).resolve().parents[1] / "results"
KB = 1024


def measure(name: str, scheme: str, target: str, kernels: str, work: Path) -> dict:
    model = load_paper_model(paper_models_dir() / f"{name}.pkl")
    rng = np.random.default_rng(0)
    work.mkdir(parents=True, exist_ok=True)
    data = write_dataset(work / "data.bin", rng.integers(-128, 128, (3, *model.input_info.shape)).astype(np.int8), rng.integers(0, 10, 3), 10)
    row = {"model": name, "scheme": scheme, "target": target, "kernels": kernels}
    t = time.time()
    try:
        record = build_project(str(paper_models_dir() / f"{name}.pkl"), model, scheme, target, work / target, num_classes=10,
                               board_options={"defines": {"TINYTRAIN_PROFILE": None}}, kernels=kernels)
    except TinyTrainError as err:  # an image that does not fit the board: the message names region and overflow
        return {**row, "error": str(err).splitlines()[0]}
    result = run_project(work / target, data, steps=3, timeout_s=600)
    meta = json.loads((work / target / "model" / "tinytrain_meta.json").read_text())
    return {**row, "planned_peak_sram_bytes": record["planned_peak_sram_bytes"], "planned_arena_bytes": meta["arena_bytes"],
            "planned_trainable_bytes": meta["trainable_bytes"], "sram_bytes": result["sram_bytes"], "flash_bytes": result["flash_bytes"],
            "instructions_per_step": result["instructions_per_step"], "instructions_by_op": result["instructions_per_step_by_op"],
            "seconds": round(time.time() - t, 1)}


def markdown(rows, timed_schemes: bool = True) -> str:
    """The table; the paper's column and the per-kind table only for the schemes the paper times (one per model)."""
    paper = " paper (sparse + reorder, STM32F746) |" if timed_schemes else ""
    lines = ["| model | scheme | target | kernels | planned peak (KB) | measured SRAM (KB): .data + .bss + stack peak + heap peak = total "
             f"| flash (KB) | instructions per step (M) |{paper}", "|---" * (9 if timed_schemes else 8) + "|"]
    for r in rows:
        head = f"| {r['model']} | {r['scheme']} | {r['target']} | {r['kernels']} |"
        tail = f" {PAPER[r['model']]} |" if timed_schemes else ""
        if "error" in r:
            lines.append(f"{head} | does not fit: {r['error']} | | |{tail}")
            continue
        s = r["sram_bytes"]
        lines.append(f"{head} {r['planned_peak_sram_bytes'] / KB:.1f} | "
                     f"{s['data'] / KB:.1f} + {s['bss'] / KB:.1f} + {s['stack_peak'] / KB:.1f} + {s['heap_peak'] / KB:.1f} = {s['total'] / KB:.1f} | "
                     f"{r['flash_bytes'] / KB:.0f} | {r['instructions_per_step'] / 1e6:.1f} |{tail}")
    return "\n".join(lines) + "\n" + ("\n" + by_op(rows) if timed_schemes else "")


def by_op(rows) -> str:
    """Per kernel kind on the M7: millions of instructions per step, reference -> optimized."""
    m7 = {(r["model"], r["kernels"]): r["instructions_by_op"] for r in rows if r["target"] == "qemu-m7" and "error" not in r}
    models = sorted({m for m, _ in m7}, key=[c[0] for c in CASES].index)
    ops = sorted({op for counts in m7.values() for op in counts}, key=lambda op: -max(c.get(op, 0) for c in m7.values()))
    lines = ["| kernel kind (Cortex-M7, M instructions per step) | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for op in ops[:10]:
        cells = []
        for m in models:
            ref, opt = m7.get((m, "reference"), {}).get(op), m7.get((m, "optimized"), {}).get(op)
            cells.append(" -> ".join(f"{v / 1e6:.1f}" for v in (ref, opt) if v is not None))
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", nargs="+", default=["reference", "optimized"], choices=["reference", "optimized"])
    ap.add_argument("--targets", nargs="+", default=["qemu-m4", "qemu-m7"], choices=["qemu-m4", "qemu-m7"])
    ap.add_argument("--all-schemes", action="store_true", help="every published scheme of each model")
    ap.add_argument("--no-fuse-trained-expansion", dest="fuse_trained_expansion", action="store_false",
                    help="pass option off: a trained expansion's update stays out of the depthwise backward")
    args = ap.parse_args()
    cases = [(name, f"paper-{label}") for name, _ in CASES for label in PAPER_SCHEMES[name]] if args.all_schemes else CASES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, scheme in cases:
            if not (paper_models_dir() / f"{name}.pkl").exists():
                print(f"{name}: model file missing; set TINYTRAIN_PAPER_MODELS", file=sys.stderr)
                return 2
            for kernels in args.kernels:
                for target in args.targets:
                    with pass_config(fuse_trained_expansion=args.fuse_trained_expansion):
                        rows.append(measure(name, scheme, target, kernels, Path(tmp) / name))
                    print(json.dumps(rows[-1]), flush=True)
    OUT.mkdir(exist_ok=True)
    meta = {"machine": f"{platform.node()} {platform.machine()}", "command": "python scripts/device_table.py " + " ".join(sys.argv[1:]), "qemu": "7.2 (Debian)",
            "board_memory": "RAM 320 KB, flash 1 MB (STM32F746)", "steps": 3}
    stem = ("device_table_all_schemes" if args.all_schemes else "device_table") + ("" if args.fuse_trained_expansion else "_no_fuse_trained_expansion")
    (OUT / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = markdown(rows, timed_schemes=not args.all_schemes)
    (OUT / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
