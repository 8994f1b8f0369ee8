"""The ``tinytrain`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def cmd_memory(args) -> int:
    from .trainer import build_training_module

    if args.plot:
        _output_file(args.plot, "--plot", (".png", ".svg", ".pdf"))
    model = _load(args)
    from relax_passes import memory_plan

    plan = memory_plan(build_training_module(model, args.scheme, args.num_classes, reorder=not args.no_reorder, budget_bytes=args.budget))
    report = {"model": model.name, "scheme": args.scheme, "reorder": not args.no_reorder, **plan.report()}
    if args.timeline:
        report["timeline"] = [{**row, "total": sum(v for k, v in row.items() if k not in ("index", "op", "node"))} for row in plan.timeline]
    if args.live_at is not None:
        index = plan.peak_index if args.live_at == "peak" else args.live_at
        try:
            buffers = plan.live_at(index)
        except TinyTrainError as err:  # the plan bounds the index; the user should see the option too
            raise TinyTrainError(f"--live-at {index}: {err}") from None
        report["live_at"] = {**plan.timeline[index], "buffers": buffers}
    if args.plot:
        from .plots import plot_memory_timeline

        plot_memory_timeline({f"{args.scheme}{'' if not args.no_reorder else ' (no reorder)'}": plan}, args.plot, model.name)
        report["plot"] = args.plot
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    kb = 1024
    print(f"{model.name} {args.scheme} ({'reordered' if report['reorder'] else 'updates after the backward'}): "
          f"peak SRAM {plan.peak_sram_bytes / kb:.1f} KB = arena {plan.arena_bytes / kb:.1f} KB + trainable params "
          f"{plan.trainable_param_bytes / kb:.1f} KB")
    print("  at the peak (op %d, %s %s): " % (plan.peak_index, report["peak_op"]["op"], report["peak_op"]["node"])
          + ", ".join(f"{k} {v / kb:.1f} KB" for k, v in plan.peak_parts.items() if v))
    print(f"  frozen weights in flash: {plan.frozen_param_bytes / kb:.1f} KB")
    for row in (row for row in report.get("timeline", []) if row["op"]):  # the rest take a field of a kernel's outputs
        print(f"  op {row['index']:4d} {row['op']:<30} {row['total'] / kb:6.1f} KB  {row['node']}")
    if "live_at" in report:
        at = report["live_at"]
        print(f"  alive at op {at['index']} ({at['op']} {at['node']}):")
        for b in at["buffers"]:
            print(f"    {b['kind']:<15} {b['size'] / kb:6.1f} KB  {b['name']} (buffer {b['buffer']}): written at op {b['written_at']} ({b['written_by']}), "
                  f"last read at op {b['last_read_at']} ({b['last_read_by']})")
    return 0


def cmd_train(args) -> int:
    from .data import load_data
    from .trainer import Int8Trainer

    if args.save:
        _output_file(args.save, "--save")
    model = _load(args)
    train_x, train_y, test_x, test_y = load_data(args.data, model.input_info.shape, args.num_classes, args.seed)  # before compiling
    trainer = Int8Trainer(model, args.scheme, args.num_classes, lr=args.lr, qas=not args.no_qas, budget_bytes=args.budget,
                          accumulate=args.accumulate)
    if test_x is None:
        test_x, test_y = train_x, train_y
    log = {"model": model.name, "scheme": args.scheme, "epochs": [], "accuracy_before": trainer.evaluate(test_x, test_y)}
    print(f"accuracy before: {log['accuracy_before']:.1%} on {len(test_y)} test images", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        order = rng.permutation(len(train_y))
        losses = []
        for i, k in enumerate(order):
            losses.append(trainer.step(train_x[k], int(train_y[k])))
            _progress(f"epoch {epoch + 1}/{args.epochs}", i + 1, len(order), f"loss {np.mean(losses[-50:]):.3f}")
        trainer.flush()
        acc = trainer.evaluate(test_x, test_y)
        print(f"\repoch {epoch + 1}/{args.epochs}: mean loss {np.mean(losses):.3f}, test accuracy {acc:.1%}" + " " * 20, file=sys.stderr)
        log["epochs"].append({"mean_loss": float(np.mean(losses)), "accuracy": acc})
    if args.save:
        trainer.save(args.save)
        log["weights"] = args.save
    if args.json:
        print(json.dumps(log))
    return 0


def parse_bytes(text: str) -> int:
    """``256KB``, ``0.5MB``, ``262144``: a memory budget in bytes (KB = 1024 bytes)."""
    units = {"": 1, "B": 1, "KB": 1024, "K": 1024, "KIB": 1024, "MB": 1024**2, "M": 1024**2, "MIB": 1024**2}
    t = text.strip().upper()
    num = t.rstrip("KMIB")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"budget {text!r}: expected bytes such as 262144, 256KB or 0.25MB") from None
    if not 1 <= value < 2**63:  # NaN fails too
        raise argparse.ArgumentTypeError(f"budget {text!r} must be at least 1 byte and finite")
    return int(value)


INT32_LIMIT = 2**31 - 1  # the board program reads counts as int32


def _count(minimum: int):
    """An argparse type: an integer from ``minimum`` to :data:`INT32_LIMIT` (argparse names the option in its message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
        if not minimum <= value <= INT32_LIMIT:
            raise argparse.ArgumentTypeError(f"{value} must be in [{minimum}, {INT32_LIMIT}]")
        return value
    return parse


def _op_index(text: str) -> int | str:
    """An argparse type: 'peak', or an op's index in a step's timeline (checked against the step once it is planned)."""
    if text == "peak":
        return text
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'peak' or an op index (0 or more)") from None
    return _count(0)(text)


def _in_range(low: float, high: float, what: str):
    """An argparse type: a number in ``[low, high]``; ``what`` says why those bounds."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
        if not low <= value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text} must be in [{low:g}, {high:g}] ({what})")
        return value
    return parse


# The step computes in float32: a learning rate must be a positive normal float32.
_learning_rate = _in_range(float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max), "a positive float32")
_seconds = _in_range(0.001, 7 * 24 * 3600.0, "up to a week")


def _output_file(path: str, option: str, suffixes: tuple[str, ...] = ()) -> None:
    """Fail before any work where ``path`` cannot be written as a file: a folder, a missing folder, a wrong suffix."""
    target = Path(path)
    if target.is_dir():
        raise TinyTrainError(f"{option} {path}: is a folder; give a file name")
    if not target.parent.is_dir():
        raise TinyTrainError(f"{option} {path}: {target.parent} is not a folder")
    if suffixes and target.suffix.lower() not in suffixes:
        raise TinyTrainError(f"{option} {path}: expected a file name ending in {' or '.join(suffixes)}")


def _progress(label: str, done: int, total: int, note: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {note}\033[K", end="", file=sys.stderr, flush=True)


def cmd_search(args) -> int:
    import os

    from relax_passes import memory_plan

    from . import search
    from .trainer import build_training_module

    _output_file(args.output, "-o")
    model = _load(args)
    settings = search.Finetune(args.data, args.num_classes, args.lr, args.epochs, args.repeats, args.val_fraction, args.seed)
    search.split(settings, tuple(model.input_info.shape))  # bad data fails here, before any process starts

    def exact_peak(scheme) -> int:
        return memory_plan(build_training_module(model, scheme, args.num_classes)).peak_sram_bytes

    base_peak = exact_peak(search.BASE)
    search.check_budget(args.budget, base_peak)  # before the analysis spends minutes
    n_convs = len(model.convs())
    weight_convs = (n_convs + 1) // 2 if args.weight_convs is None else args.weight_convs
    schemes = search.candidates(n_convs, weight_convs, tuple(args.ratios))
    cache = args.cache or f"{args.output}.cache"
    jobs = args.jobs or min(2, os.cpu_count() or 1)

    def analyse(label, schemes_):
        return search.analyse(args.model, schemes_, settings, cache, jobs, lambda done, total, note: _progress(label, done, total, note))

    try:
        results = analyse("contribution analysis", schemes)
        print(file=sys.stderr)
        options, base_acc, _ = search.options_from(results)
        answers = search.search(options, base_peak, args.budget, exact_peak, args.max_plans)[: max(1, args.verify)]
        measured = analyse("measuring the best combinations", [a.scheme for a in answers]) if args.verify else {}
        print(file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished fine-tunes are cached in {cache}; run the same command again to resume", file=sys.stderr)
        return 130
    found = max(answers, key=lambda a: measured[a.scheme]["accuracy"]) if measured else answers[0]
    record = {**found.scheme.to_json(), "predicted_gain": found.gain, "baseline_accuracy": base_acc,
              "validation_accuracy": measured[found.scheme]["accuracy"] if measured else None,
              "peak_sram_bytes": found.peak_sram_bytes, "budget_bytes": args.budget, "model": model.name, "settings": vars(settings),
              "measured": [{"scheme": a.scheme.name, "predicted_gain": a.gain, "peak_sram_bytes": a.peak_sram_bytes,
                            "validation_accuracy": measured[a.scheme]["accuracy"]} for a in answers if measured],
              "contributions": [{"group": o.group, "value": o.value, "gain": o.gain, "extra_bytes": o.cost} for o in options]}
    Path(args.output).write_text(json.dumps(record, indent=1))
    if args.json:
        print(json.dumps(record))
    else:
        s = found.scheme
        print(f"wrote {args.output}: biases of the last {s.n_bias_update} convs, weights {list(s.weight_idx)} at ratios "
              f"{list(s.weight_ratio)}; exact peak SRAM {found.peak_sram_bytes / 1024:.1f} KB of {args.budget / 1024:.1f} KB; "
              f"predicted gain {found.gain:+.1%} over the classifier alone ({base_acc:.1%} validation accuracy)"
              + (f", measured {record['validation_accuracy']:.1%}" if measured else ""))
    return 0


def _ratios(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios {text!r}: expected comma-separated fractions such as 0.125,0.25,0.5,1") from None


def cmd_build(args) -> int:
    from .boards import build_project

    target = Path(args.output)
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise TinyTrainError(f"-o {args.output}: cannot be the build folder: {existing} is a file")
    model = _load(args)
    board_options = {}
    if args.target == "stm32f746":  # a real board has no files: the dataset is compiled into flash
        board_options["dataset"] = str(_dataset_file(args.data, Path(args.output), model.input_info.shape, args.num_classes, args.seed))
        board_options["steps"] = args.steps
    if args.profile:
        board_options["defines"] = {"TINYTRAIN_PROFILE": None}
    record = build_project(args.model, model, args.scheme, args.target, args.output, args.num_classes, args.lr, board_options,
                           kernels=args.kernels)
    if args.json:
        print(json.dumps(record))
    else:
        b = record["build"]
        print(f"built {record['target']} project in {args.output}: planned peak SRAM {record['planned_peak_sram_bytes'] / 1024:.1f} KB"
              + (f", flash {b['flash_bytes'] / 1024:.1f} KB, .data+.bss {(b['data_bytes'] + b['bss_bytes']) / 1024:.1f} KB"
                 if b.get("flash_bytes") is not None else ""))
    return 0


def cmd_run(args) -> int:
    from .boards import read_build, run_project

    record = read_build(args.build_dir)
    data = _dataset_file(args.data, Path(args.build_dir), tuple(record["input_shape"]), record["num_classes"], args.seed)
    result = run_project(args.build_dir, data, args.steps, lr=args.lr, eval_count=args.eval_count, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(result))
        return 0
    losses = result["losses"]
    print(f"{record['target']}: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; weights in {result['weights']}")
    sram = result.get("sram_bytes", {})
    print("  SRAM: " + ", ".join(f"{k} {v / 1024:.1f} KB" for k, v in sram.items() if isinstance(v, (int, float))))
    if result.get("instructions_per_step"):
        print(f"  instructions per step: {result['instructions_per_step'] / 1e6:.1f} M")
    return 0


def _dataset_file(spec: str, folder: Path, input_shape, num_classes: int, seed: int) -> Path:
    """A boards' dataset file: ``spec`` itself when it is one (.bin), else digits or a .npz converted into ``folder``."""
    from .boards import write_dataset
    from .data import load_data

    if spec.endswith(".bin"):
        return Path(spec)
    x, y, _, _ = load_data(spec, tuple(input_shape), num_classes, seed)
    folder.mkdir(parents=True, exist_ok=True)
    return write_dataset(folder / "data.bin", x, y, num_classes)


def cmd_export(args) -> int:
    from .boards import trained_model
    from .importers.onnx_export import export_onnx

    _output_file(args.onnx, "--onnx")
    export_onnx(trained_model(args.build_dir), args.onnx)
    print(f"wrote {args.onnx}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


DATA_HELP = "'digits' (scikit-learn), 'digits:5-9' (those digits, renumbered from 0) or a .npz with images/labels (+ test_images/test_labels)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinytrain", description="On-device int8 training under 256 KB, on Apache TVM.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_cmd(name, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("model", help="model file: the paper's .pkl, or .onnx (QDQ int8, or fp32 with --calibration)")
        sp.add_argument("--calibration", help=".npy float32 NCHW batch for quantizing an fp32 ONNX model")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    def training_cmd(name, help_, with_lr=False, with_scheme=True, with_pass_options=True):
        sp = model_cmd(name, help_)
        if with_pass_options:  # read in this process only (search's parallel candidates would not see them)
            sp.add_argument("--no-fuse-trained-expansion", dest="fuse_trained_expansion", action="store_false",
                            help="pass option: keep a trained expansion's weight update out of its depthwise backward "
                                 "(a little faster, more SRAM)")
            sp.add_argument("--no-recompute-masks", dest="recompute_masks", action="store_false",
                            help="pass option: store the clamp masks of a block whose expansion is trained whole, instead of "
                                 "recomputing them in its backward (a little faster, more SRAM)")
            sp.add_argument("--no-masked-reads", dest="masked_reads", action="store_false",
                            help="pass option: store a residual block's masked projection gradient instead of reading the "
                                 "block's output gradient through the mask (a little faster, more SRAM)")
            sp.add_argument("--no-stream-layers", dest="stream_layers", action="store_false",
                            help="pass option: stream the first conv alone, not the frozen layers after it (more SRAM)")
            sp.add_argument("--recompute-streamed-expansion", choices=["at-peak", "always", "never"], default="at-peak",
                            help="pass option: when a streamed 1x1 expansion keeps no ring of rows and its depthwise reader "
                                 "makes them per channel group (less SRAM, more instructions); at-peak: where that lowers "
                                 "the step's peak by 1 KB or more")
            sp.add_argument("--no-narrow-peak-tiles", dest="narrow_peak_tiles", action="store_false",
                            help="pass option: keep the optimized fused block backward's planes per tile where it is the "
                                 "step's peak (a little faster, more SRAM)")
            sp.add_argument("--residual-backward-in-place", choices=["at-peak", "always", "never"], default="at-peak",
                            help="pass option: when a residual block's backward writes its input gradient over its output "
                                 "gradient a band of rows at a time (less SRAM, more instructions); at-peak: where that "
                                 "lowers the step's peak by 1 KB or more")
            sp.add_argument("--checkpoint-masks", choices=["at-peak", "always", "never"], default="at-peak",
                            help="pass option: when the clamp masks held from the forward to the backward are made again "
                                 "there from one checkpointed activation (less SRAM, more instructions); at-peak: where "
                                 "that lowers the step's peak by 1 KB or more")
        if with_scheme:
            sp.add_argument("--scheme", default="full", help="paper-<label>, full, bias-only:N, last-k:N or a .json file")
        sp.add_argument("--num-classes", type=int, default=10, help="classes of the new float32 head")
        if with_lr:
            sp.add_argument("--lr", type=_learning_rate, default=0.003, help="SGD learning rate (int8 weights with QAS and the float head)")
        return sp

    model_cmd("inspect", "per-layer shapes, MACs, params and activation bytes").set_defaults(func=cmd_inspect)
    sp = model_cmd("predict", "classify images with TVM-compiled int8 inference")
    sp.add_argument("images", nargs="+", help="image files (RGB; centre-cropped and resized to the model input)")
    sp.add_argument("--top", type=_count(1), default=5, help="how many classes to report")
    sp.set_defaults(func=cmd_predict)
    sp = training_cmd("memory", "peak SRAM of one training step and its parts (static arena plan)")
    sp.add_argument("--no-reorder", action="store_true", help="run every update after the whole backward (the baseline)")
    sp.add_argument("--plot", help="write the per-op memory timeline to this .png")
    sp.add_argument("--budget", type=parse_bytes, help="fail if the step needs more SRAM than this (e.g. 256KB)")
    sp.add_argument("--timeline", action="store_true",
                    help="also list every kernel call of the step with the bytes alive while it runs (--json: every binding)")
    sp.add_argument("--live-at", metavar="OP", type=_op_index,
                    help="also list the buffers alive at op OP (its index in the timeline, or 'peak'): what makes up that op's bytes")
    sp.set_defaults(func=cmd_memory)
    sp = training_cmd("train", "train on the host with the TVM-compiled int8 step", with_lr=True)
    sp.add_argument("--data", default="digits", help=DATA_HELP)
    sp.add_argument("--epochs", type=_count(1), default=1)
    sp.add_argument("--no-qas", action="store_true", help="train without quantization-aware scaling")
    sp.add_argument("--seed", type=_count(0), default=0)
    sp.add_argument("--accumulate", type=int, default=1, help="images per update by gradient accumulation (batch 1 each)")
    sp.add_argument("--save", help="write all parameters to this .npz")
    sp.add_argument("--budget", type=parse_bytes, help="refuse a scheme that needs more SRAM than this (e.g. 256KB)")
    sp.set_defaults(func=cmd_train)
    sp = training_cmd("search", "find the sparse-update scheme with the largest accuracy gain under a memory budget",
                      with_lr=True, with_scheme=False, with_pass_options=False)
    sp.add_argument("--data", default="digits", help=DATA_HELP + "; a validation split of its train part scores the candidates")
    sp.add_argument("--budget", type=parse_bytes, required=True, help="peak SRAM the scheme must fit (e.g. 100KB)")
    sp.add_argument("-o", "--output", required=True, help="scheme .json to write (readable by --scheme)")
    sp.add_argument("--epochs", type=int, default=1, help="epochs each candidate is fine-tuned")
    sp.add_argument("--repeats", type=int, default=2, help="data orders each candidate's accuracy is averaged over")
    sp.add_argument("--val-fraction", type=float, default=0.2, help="share of the train data held out to score candidates")
    sp.add_argument("--weight-convs", type=int, help="weights of the last K convs are candidates (default: half of the convs)")
    sp.add_argument("--ratios", type=_ratios, default=[0.125, 0.25, 0.5, 1.0], help="channel ratios tried per weight")
    sp.add_argument("--jobs", type=_count(1), help="parallel fine-tuning processes (default: min(2, CPUs))")
    sp.add_argument("--cache", help="folder of finished candidates, reused on rerun (default: <output>.cache)")
    sp.add_argument("--max-plans", type=_count(1), default=40, help="exact memory plans the search may make")
    sp.add_argument("--verify", type=_count(0), default=3, help="fine-tune the N fitting combinations of largest predicted gain "
                    "and keep the best measured (gains do not quite add up); 0: trust the predicted gain")
    sp.add_argument("--seed", type=_count(0), default=0)
    sp.set_defaults(func=cmd_search)
    sp = training_cmd("build", "emit the training step as C and build it for a board", with_lr=True)
    sp.add_argument("--target", default="host", choices=["host", "qemu-m4", "qemu-m7", "stm32f746"])
    sp.add_argument("-o", "--output", required=True, help="build folder")
    sp.add_argument("--data", default="digits", help="stm32f746 only (no files on a board): dataset compiled in, as for `run`")
    sp.add_argument("--steps", type=_count(1), default=100, help="stm32f746 only: training steps the board runs")
    sp.add_argument("--seed", type=_count(0), default=0)
    sp.add_argument("--kernels", default="optimized", choices=["optimized", "reference"],
                    help="kernel schedules: optimized (default) or the plain reference ones; both give the same bits")
    sp.add_argument("--profile", action="store_true", help="count the board's instructions per kernel kind (log.json 'profile')")
    sp.set_defaults(func=cmd_build)
    sp = sub.add_parser("run", help="train on the built project (host or emulated board)")
    sp.add_argument("build_dir")
    sp.add_argument("--data", default="digits", help="a dataset .bin, 'digits', or a .npz with images/labels")
    sp.add_argument("--steps", type=_count(1), default=10)
    sp.add_argument("--lr", type=_learning_rate, help="override the built-in learning rate")
    sp.add_argument("--eval-count", type=_count(0), default=0, help="records to evaluate before and after training")
    sp.add_argument("--timeout", type=_seconds, default=600.0, help="seconds before a hung run is killed")
    sp.add_argument("--seed", type=_count(0), default=0)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_run)
    sp = sub.add_parser("export", help="write the trained weights of a build folder as a QDQ ONNX model")
    sp.add_argument("build_dir")
    sp.add_argument("--onnx", required=True, help="output .onnx path")
    sp.set_defaults(func=cmd_export)
    sp = sub.add_parser("demo", help="the main job on the default model and data")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from relax_passes import pass_config

    try:
        with pass_config(fuse_trained_expansion=getattr(args, "fuse_trained_expansion", True),
                         recompute_masks=getattr(args, "recompute_masks", True), masked_reads=getattr(args, "masked_reads", True),
                         stream_layers=getattr(args, "stream_layers", True),
                         recompute_streamed_expansion=getattr(args, "recompute_streamed_expansion", "at-peak"),
                         checkpoint_masks=getattr(args, "checkpoint_masks", "at-peak"),
                         residual_backward_in_place=getattr(args, "residual_backward_in_place", "at-peak"),
                         narrow_peak_tiles=getattr(args, "narrow_peak_tiles", True)):
            return args.func(args)
    except TinyTrainError as err:
        print(f"tinytrain: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
