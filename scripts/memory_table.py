#!/usr/bin/env python3
"""Peak SRAM of one training step for the paper's three models, every published scheme, with and without reordering.

Writes results/memory_table.json, results/memory_table.md (the README table) and
results/memory_timeline_mcunet.png; with ``--no-fuse-trained-expansion`` (the pass option of FuseDepthwiseBackward,
on by default, off) results/memory_table_no_fuse_trained_expansion.json and .md.  Needs ../shared/models
(or $TINYTRAIN_PAPER_MODELS).

    .venv/bin/python scripts/memory_table.py [--no-fuse-trained-expansion]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from relax_passes import memory_plan, pass_config
from tvm_tinytrain.demo import PAPER_MODELS, paper_models_dir
from tvm_tinytrain.importers.paper_pkl import load_paper_model
from tvm_tinytrain.plots import plot_memory_timeline
from tvm_tinytrain.scheme import PAPER_SCHEMES
from tvm_tinytrain.trainer import build_training_module

# PAPER.md section 4: full / sparse / sparse+reorder (KB) for the largest published scheme of each model.
PAPER_KB = {"mcunet-5fps": (3650, 560, 173), "mbv2-w0.35": (2939, 335, 141), "proxyless-w0.3": (2745, 326, 135)}
OUT = Path(__file__).resolve().parents[1] / "results"


def measure(model, scheme: str, reorder: bool) -> dict:
    t = time.time()
    plan = memory_plan(build_training_module(model, scheme, num_classes=10, reorder=reorder))
    return {"scheme": scheme, "reorder": reorder, "seconds": round(time.time() - t, 1), **plan.report()}, plan


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-fuse-trained-expansion", dest="fuse_trained_expansion", action="store_false",
                    help="pass option of FuseDepthwiseBackward off; writes memory_table_no_fuse_trained_expansion.*")
    args = ap.parse_args()
    stem = "memory_table" if args.fuse_trained_expansion else "memory_table_no_fuse_trained_expansion"
    OUT.mkdir(exist_ok=True)
    rows, timelines = [], {}
    for name in PAPER_MODELS:
        path = paper_models_dir() / f"{name}.pkl"
        if not path.exists():
            print(f"{path} missing; set TINYTRAIN_PAPER_MODELS", file=sys.stderr)
            return 2
        model = load_paper_model(path)
        for scheme in ["full", *(f"paper-{label}" for label in PAPER_SCHEMES[name])]:
            for reorder in (False, True):
                with pass_config(fuse_trained_expansion=args.fuse_trained_expansion):
                    row, plan = measure(model, scheme, reorder)
                row["model"] = name
                rows.append(row)
                print(f"{name:15s} {scheme:12s} reorder={reorder!s:5s} peak {row['peak_sram_bytes'] / 1024:7.1f} KB "
                      f"(arena {row['parts']['arena_bytes'] / 1024:.1f} + params {row['parts']['trainable_param_bytes'] / 1024:.1f})", flush=True)
                if name == "mcunet-5fps" and scheme == "paper-99kb":
                    timelines[f"{scheme}, {'reordered' if reorder else 'updates after backward'}"] = plan
    meta = {"machine": f"{platform.node()} {platform.machine()} {platform.processor()}", "python": platform.python_version(),
            "command": "python scripts/memory_table.py " + " ".join(sys.argv[1:]), "batch": 1, "resolution": 128, "num_classes": 10}
    (OUT / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (OUT / f"{stem}.md").write_text(markdown(rows))
    if args.fuse_trained_expansion:
        plot_memory_timeline(timelines, str(OUT / "memory_timeline_mcunet.png"), "MCUNet-5FPS, paper-99kb, 128x128, batch 1")
    print((OUT / f"{stem}.md").read_text())
    return 0


def markdown(rows) -> str:
    """The README table; the ratios compare with the full update without reordering, with and without the parameters."""
    kb = lambda b: f"{b / 1024:.0f}"  # noqa: E731
    lines = ["| model | scheme | updates after backward: peak SRAM (KB) | reordered: peak SRAM (KB) | reordered: arena + trainable params (KB) "
             "| full / this: SRAM | full / this: arena |", "|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["scheme"], r["reorder"]): r for r in rows}
    for (model, scheme, reorder), r in by.items():
        if reorder:
            continue
        rr = by[(model, scheme, True)]
        full = by[(model, "full", False)]
        lines.append(f"| {model} | {scheme} | {kb(r['peak_sram_bytes'])} | {kb(rr['peak_sram_bytes'])} | "
                     f"{kb(rr['parts']['arena_bytes'])} + {kb(rr['parts']['trainable_param_bytes'])} | "
                     f"{full['peak_sram_bytes'] / rr['peak_sram_bytes']:.1f}x | {full['parts']['arena_bytes'] / rr['parts']['arena_bytes']:.1f}x |")
    lines += ["", "The paper (PAPER.md section 4), peak SRAM in KB: full / sparse / sparse + reorder, for its largest scheme:", "",
              "| model | full | sparse | sparse + reorder | full / (sparse + reorder) |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {f} | {s} | {r} | {f / r:.1f}x |" for m, (f, s, r) in PAPER_KB.items()]
    return "\n".join(lines) + "\n"


def rerender() -> None:
    """Rewrite the table from results/memory_table.json (after a change of presentation only)."""
    (OUT / "memory_table.md").write_text(markdown(json.loads((OUT / "memory_table.json").read_text())["rows"]))


if __name__ == "__main__":
    sys.exit(main())
