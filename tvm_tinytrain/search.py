"""Scheme search: contribution analysis of single updates, then the best combination under a memory budget.

PAPER.md section 3: fine-tune with one extra update at a time (the biases of
the last n convs, or one conv's weight at one channel ratio) besides the new
classifier, record its accuracy gain over the classifier alone, assume gains
add up, and pick at most one bias group and at most one ratio per conv so
that the summed gain is largest and the step fits the budget.

Fine-tuning runs on a validation split carved from the *train* data, so the
test split never shapes the scheme.  Each candidate is a separate process job
(a TVM compile plus a few hundred batch-1 steps); its result is written to a
cache file named by a hash of everything it depends on, atomically, so an
interrupted analysis resumes where it stopped.

The memory cost of a scheme is the planner's exact peak SRAM, but planning
takes ~1 s (default model) to ~4 s (MCUNet), too slow to score every
combination.  The search therefore ranks combinations by an additive estimate
(each candidate's exact peak minus the classifier-only peak) with a
multiple-choice knapsack, then checks its answers with the exact planner.
The estimate overcounts, since candidates share the backward chain; solving
the knapsack at inflated capacities finds the combinations that exploit that
sharing, and a local search with exact plans adds what still fits.  A
combination whose exact peak is over the budget is repaired by dropping the
update with the least gain per byte until it fits.

Gains do not quite add up (on the default model, biases that gain alone add
nothing next to trained weights), so :func:`search` also returns the
knapsack's answers at smaller capacities, and ``tinytrain search --verify N``
fine-tunes the N best fitting combinations like candidates (cached too) and
keeps the best measured one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import TinyTrainError
from .scheme import SparseScheme

ANALYSIS_VERSION = 1  # part of every cache key: bump when the fine-tuning protocol changes
BASE = SparseScheme(0, name="classifier only")


# ---------------------------------------------------------------- candidates


def candidates(n_convs: int, weight_convs: int, ratios: tuple[float, ...]) -> list[SparseScheme]:
    """The classifier-only baseline, every bias group ``bias-only:n``, and each of the last ``weight_convs`` weights at each ratio."""
    if not 0 <= weight_convs <= n_convs:
        raise TinyTrainError(f"weight-convs: {weight_convs} must be in [0, {n_convs}] for a model with {n_convs} convs")
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise TinyTrainError(f"ratios: {list(ratios)} must be fractions in (0, 1]")
    out = [BASE] + [SparseScheme(n, name=f"bias-only:{n}") for n in range(1, n_convs + 1)]
    out += [SparseScheme(0, (i,), (r,), f"weight {i} @ {r:g}") for i in range(n_convs - weight_convs, n_convs) for r in sorted(set(ratios))]
    return out


# ---------------------------------------------------------------- contribution analysis


@dataclass(frozen=True)
class Finetune:
    """How one candidate is fine-tuned and scored (every field is part of the cache key)."""

    data: str
    num_classes: int
    lr: float = 0.02
    epochs: int = 1
    repeats: int = 2  # data orders averaged: batch-1 SGD is noisy, and the gains are small differences
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "repeats"):
            if getattr(self, name) < 1:
                raise TinyTrainError(f"{name}: {getattr(self, name)} must be at least 1")
        if not 0 < self.val_fraction < 1:
            raise TinyTrainError(f"val-fraction: {self.val_fraction} must be in (0, 1)")


@lru_cache(maxsize=2)
def _model(path: str):
    from .importers import load_model

    return load_model(path)


@lru_cache(maxsize=2)
def split(settings: Finetune, input_shape: tuple[int, ...]):
    """(train_x, train_y, val_x, val_y): a seeded validation split of the train data; errors if either part is empty."""
    from .data import load_data

    x, y, _, _ = load_data(settings.data, input_shape, settings.num_classes, settings.seed)
    order = np.random.default_rng(settings.seed).permutation(len(y))
    n_val = int(len(y) * settings.val_fraction)
    if n_val < 1 or n_val == len(y):
        raise TinyTrainError(f"data {settings.data!r}: {len(y)} train images leave no validation or no training split "
                             f"at val-fraction {settings.val_fraction}")
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def accuracy_over_orders(trainer, train, evaluation, epochs: int, seeds) -> list[float]:
    """Accuracy on ``evaluation`` (x, y) after ``epochs`` of batch-1 SGD over ``train`` (x, y), once per seed of the shuffling.

    The parameters restart from the trainer's initial ones for each seed, so one compile serves every data order.
    """
    init = dict(trainer.params)
    accuracies = []
    for seed in seeds:
        trainer.params = dict(init)
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            for k in rng.permutation(len(train[1])):
                trainer.step(train[0][k], int(train[1][k]))
        accuracies.append(trainer.evaluate(*evaluation))
    trainer.params = init
    return accuracies


def finetune(model_path: str, scheme: SparseScheme, settings: Finetune) -> dict:
    """Validation accuracy after fine-tuning ``scheme`` (mean over ``repeats`` data orders), and its exact peak SRAM."""
    from .trainer import Int8Trainer

    start = time.perf_counter()
    model = _model(model_path)
    train_x, train_y, val_x, val_y = split(settings, tuple(model.input_info.shape))
    trainer = Int8Trainer(model, scheme, settings.num_classes, lr=settings.lr)
    accuracies = accuracy_over_orders(trainer, (train_x, train_y), (val_x, val_y), settings.epochs,
                                      [[settings.seed, r] for r in range(settings.repeats)])
    return {"accuracy": float(np.mean(accuracies)), "accuracies": accuracies,
            "peak_sram_bytes": trainer.memory_plan().peak_sram_bytes, "seconds": round(time.perf_counter() - start, 2)}


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_key(model_path: str, scheme: SparseScheme, settings: Finetune) -> dict:
    """What a result depends on: the model's bytes, the data (a file's bytes), the candidate, the protocol and the code version."""
    data = _file_digest(settings.data) if Path(settings.data).is_file() else settings.data
    return {"version": ANALYSIS_VERSION, "model": _file_digest(model_path), "data": data, "scheme": scheme.to_json(),
            **{k: v for k, v in asdict(settings).items() if k != "data"}}


def _write_atomic(path: Path, payload: dict) -> None:
    """Write then rename, so an interrupted run never leaves a half-written cache entry."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def analyse(model_path: str, schemes: list[SparseScheme], settings: Finetune, cache_dir: str | Path, jobs: int = 1,
            progress: Callable[[int, int, str], None] | None = None, run: Callable | None = None) -> dict[SparseScheme, dict]:
    """``run`` (default :func:`finetune`) for every scheme not yet in ``cache_dir``; ``jobs`` > 1 runs them in parallel processes.

    Results are cached as they finish, so a run stopped by Ctrl-C keeps what
    it finished; the next call with the same arguments only runs the rest.
    """
    run = run or finetune  # looked up per call, so tests can stand in a cheaper fine-tune
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    results, todo = {}, []
    for scheme in schemes:
        key = cache_key(model_path, scheme, settings)
        path = cache / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")
        if path.exists():
            results[scheme] = json.loads(path.read_text())["result"]
        else:
            todo.append((scheme, key, path))

    def finished(scheme, key, path, result):
        _write_atomic(path, {"key": key, "result": result})
        results[scheme] = result
        if progress:
            progress(len(results), len(schemes), f"{scheme.name}: {result['accuracy']:.1%}")

    if progress:
        progress(len(results), len(schemes), f"{len(results)} cached")
    if jobs <= 1 or len(todo) <= 1:
        for scheme, key, path in todo:
            finished(scheme, key, path, run(model_path, scheme, settings))
        return {s: results[s] for s in schemes}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent has TVM initialised (it planned the baseline), which is not fork-safe
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(run, model_path, scheme, settings): (scheme, key, path) for scheme, key, path in todo}
        for future in as_completed(futures):
            finished(*futures[future], future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return {s: results[s] for s in schemes}  # in the order asked, not as finished: the search breaks ties by order


# ---------------------------------------------------------------- search


@dataclass(frozen=True)
class Option:
    """One choice of a group (``"bias"``: ``value`` = n; a conv index: ``value`` = ratio), its gain and estimated extra bytes."""

    group: str | int
    value: float
    gain: float
    cost: int


def options_from(results: dict[SparseScheme, dict]) -> tuple[list[Option], float, int]:
    """Options (gain over the baseline, extra peak over its peak) from analysis results; plus the baseline's accuracy and peak."""
    base = results[BASE]
    out = []
    for scheme, r in results.items():
        if scheme == BASE:
            continue
        group, value = ("bias", scheme.n_bias_update) if not scheme.weight_idx else (scheme.weight_idx[0], scheme.weight_ratio[0])
        out.append(Option(group, value, r["accuracy"] - base["accuracy"], max(0, r["peak_sram_bytes"] - base["peak_sram_bytes"])))
    return out, base["accuracy"], base["peak_sram_bytes"]


def scheme_of(chosen) -> SparseScheme:
    """The scheme that trains the chosen options (and the classifier)."""
    n_bias = next((int(o.value) for o in chosen if o.group == "bias"), 0)
    weights = sorted((o.group, o.value) for o in chosen if o.group != "bias")
    name = " + ".join([f"bias-only:{n_bias}"] + [f"w{i}@{r:g}" for i, r in weights])
    return SparseScheme(n_bias, tuple(i for i, _ in weights), tuple(float(r) for _, r in weights), name)


def knapsack(options: list[Option], capacity: int, cells: int = 4096) -> tuple[Option, ...]:
    """At most one option per group, largest summed gain with summed cost <= ``capacity`` (multiple-choice knapsack).

    Dynamic programming over the capacity in ``capacity / cells`` byte units;
    costs are rounded up to units, so the answer's summed cost never exceeds
    ``capacity`` (exact when costs are multiples of the unit).  Options
    without a positive gain only cost memory and are left out; of options
    with equal gain (frequent: accuracies are counts) the cheaper wins.
    """
    if capacity < 0:
        return ()
    unit = max(1, -(-capacity // cells))
    size = capacity // unit + 1
    groups: dict = {}
    for o in sorted(options, key=_cheapest_first):
        if o.gain > 0:
            groups.setdefault(o.group, []).append(o)
    best = np.zeros(size)  # best[c]: largest gain of the groups so far within c units
    picks = []  # per group, the option index chosen at each capacity (-1: none)
    for opts in groups.values():
        new, pick = best.copy(), np.full(size, -1)
        for j, o in enumerate(opts):
            w = -(-o.cost // unit)
            if w >= size:
                continue
            cand = np.full(size, -np.inf)
            cand[w:] = best[: size - w] + o.gain
            better = cand > new + 1e-12
            new[better], pick[better] = cand[better], j
        best = new
        picks.append((opts, pick))
    chosen, c = [], size - 1
    for opts, pick in reversed(picks):
        if pick[c] >= 0:
            o = opts[pick[c]]
            chosen.append(o)
            c -= -(-o.cost // unit)
    return tuple(chosen)


def _cheapest_first(o: Option):
    return o.cost, -o.gain, str(o.group), o.value


@dataclass(frozen=True)
class Combination:
    """A searched answer: its options, their summed (predicted) gain and the planner's exact peak."""

    chosen: tuple[Option, ...]
    gain: float
    peak_sram_bytes: int

    @property
    def scheme(self) -> SparseScheme:
        return scheme_of(self.chosen)


def check_budget(budget: int, base_peak: int) -> None:
    """A budget below the classifier-only step leaves nothing to search: the error gives that minimum."""
    if budget < base_peak:
        raise TinyTrainError(f"budget: {budget} bytes ({budget / 1024:.1f} KB) is below the smallest possible training step, "
                             f"the classifier alone (bias-only:0): {base_peak} bytes ({base_peak / 1024:.1f} KB)")


def search(options: list[Option], base_peak: int, budget: int, exact_peak: Callable[[SparseScheme], int],
           max_plans: int = 40, smaller: tuple[float, ...] = (0.75, 0.5, 0.25)) -> list[Combination]:
    """Combinations that fit ``budget`` by ``exact_peak``, the largest summed gain first (see module doc).

    The first is the search's answer.  The others are the knapsack's answers
    for ``smaller`` shares of the capacity it settled on: gains do not quite
    add up, so a caller can measure a few and keep the best.
    ``exact_peak`` is called at most ``max_plans`` times (each distinct scheme
    once), plus as often as a repair needs and once per smaller share.
    """
    check_budget(budget, base_peak)
    peaks: dict[SparseScheme, int] = {BASE: base_peak}

    def peak(chosen) -> int:
        s = scheme_of(chosen)
        if s not in peaks:
            peaks[s] = exact_peak(s)
        return peaks[s]

    def gain(chosen) -> float:
        return sum(o.gain for o in chosen)

    room = budget - base_peak
    first = knapsack(options, room)
    fits = peak(first) <= budget
    best = first if fits else _repair(first, budget, peak)
    # the estimate is off by an unknown factor (it overcounts shared backward work; it misses a peak that moves):
    # bisect on the capacity's scale for the largest knapsack answer the exact planner accepts
    lo, hi = (1.0, max(1.0, sum(o.cost for o in options) / max(room, 1))) if fits else (0.0, 1.0)
    while hi - lo > 0.01 * hi and len(peaks) < max_plans:
        mid = (lo + hi) / 2
        chosen = knapsack(options, int(room * mid))
        if peak(chosen) <= budget:
            lo = mid
            if gain(chosen) > gain(best):
                best = chosen
        else:
            hi = mid
    best = _local_search(best, options, budget, peak, lambda: len(peaks) < max_plans)
    answers = {scheme_of(best): best}
    for share in smaller:
        chosen = knapsack(options, int(room * lo * share))
        if peak(chosen) <= budget:
            answers.setdefault(scheme_of(chosen), chosen)
    return sorted((Combination(c, gain(c), peak(c)) for c in answers.values()), key=lambda c: -c.gain)


def _repair(chosen, budget: int, peak) -> tuple[Option, ...]:
    """Drop the option with the least gain per estimated byte until the exact peak fits (the baseline always does)."""
    chosen = sorted(chosen, key=lambda o: o.gain / max(o.cost, 1))
    while chosen and peak(chosen) > budget:
        chosen.pop(0)
    return tuple(chosen)


def _local_search(chosen, options: list[Option], budget: int, peak, can_plan) -> tuple[Option, ...]:
    """Greedy improvement with exact plans: take the single change (add or swap one group's option) that gains most and fits."""
    chosen = tuple(chosen)
    while can_plan():
        current = {o.group: o for o in chosen}
        total = sum(o.gain for o in chosen)
        moves = []
        for o in options:
            if current.get(o.group) == o:
                continue
            moved = tuple(c for c in chosen if c.group != o.group) + (o,)
            if sum(c.gain for c in moved) > total + 1e-12:
                moves.append(moved)
        moves.sort(key=lambda m: (-sum(c.gain for c in m), sum(c.cost for c in m)))
        for moved in moves:
            if not can_plan():
                return chosen
            if peak(moved) <= budget:
                chosen = moved
                break
        else:
            return chosen
    return chosen
