"""Scheme search: the knapsack against brute force, exact-peak repair, the resumable analysis cache, the CLI and its errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from tvm_tinytrain import search
from tvm_tinytrain.cli import main
from tvm_tinytrain.data import load_data
from tvm_tinytrain.default_model import INPUT_SHAPE, TARGET_CLASSES, task
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.scheme import SparseScheme, parse_scheme

BASE_PEAK = 1000


def synthetic_options(seed: int) -> list[search.Option]:
    """A bias group with 4 choices and 4 convs with 3 ratios each: random gains (some negative) and integer byte costs."""
    rng = np.random.default_rng(seed)
    opts = [search.Option("bias", n, float(rng.normal(0.02, 0.02)), int(rng.integers(10, 200))) for n in range(1, 5)]
    opts += [search.Option(i, r, float(rng.normal(0.02, 0.02)), int(rng.integers(10, 200))) for i in (4, 5, 6, 7) for r in (0.25, 0.5, 1.0)]
    return opts


def brute_force(options, fits) -> float:
    """The largest summed gain over every choice of at most one option per group that ``fits``."""
    groups = {}
    for o in options:
        groups.setdefault(o.group, [None]).append(o)
    best = 0.0
    for combo in itertools.product(*groups.values()):
        chosen = [o for o in combo if o is not None]
        if fits(chosen):
            best = max(best, sum(o.gain for o in chosen))
    return best


def additive_peak(options):
    """An exact-peak stand-in: the baseline plus a penalty of ``extra`` times each option's cost."""
    by_scheme = {}
    for o in options:
        by_scheme[(o.group, o.value)] = o.cost

    def peak(scheme: SparseScheme, extra: float = 1.0) -> int:
        cost = (by_scheme[("bias", scheme.n_bias_update)] if scheme.n_bias_update else 0)
        cost += sum(by_scheme[(i, r)] for i, r in zip(scheme.weight_idx, scheme.weight_ratio))
        return BASE_PEAK + int(cost * extra)
    return peak


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_and_search_find_the_brute_force_optimum(seed):
    options = synthetic_options(seed)
    capacity = 300
    best = brute_force(options, lambda chosen: sum(o.cost for o in chosen) <= capacity)
    chosen = search.knapsack(options, capacity)
    assert len({o.group for o in chosen}) == len(chosen) and sum(o.cost for o in chosen) <= capacity
    assert sum(o.gain for o in chosen) == pytest.approx(best)
    answers = search.search(options, BASE_PEAK, BASE_PEAK + capacity, additive_peak(options))
    found = answers[0]
    assert found.gain == pytest.approx(best) and found.peak_sram_bytes <= BASE_PEAK + capacity
    # the smaller answers: distinct, fitting, by decreasing predicted gain
    assert len({a.scheme for a in answers}) == len(answers) > 1 and all(a.peak_sram_bytes <= BASE_PEAK + capacity for a in answers)
    assert [a.gain for a in answers] == sorted((a.gain for a in answers), reverse=True)


def test_equal_gains_go_to_the_cheaper_option_whatever_the_order():
    """Gains are differences of accuracy counts, so ties are common: the answer must not depend on the order of the analysis."""
    options = synthetic_options(2) + [search.Option(4, 0.125, 0.05, 20), search.Option(4, 0.75, 0.05, 30)]
    answers = {tuple(a.scheme for a in search.search(order, BASE_PEAK, BASE_PEAK + 300, additive_peak(order)))
               for order in (options, options[::-1], sorted(options, key=lambda o: -o.gain))}
    assert len(answers) == 1
    chosen = search.knapsack(options, 300)
    assert search.Option(4, 0.125, 0.05, 20) in chosen


@pytest.mark.parametrize("extra", [0.5, 1.7])
def test_exact_peak_decides_when_the_estimate_is_off(extra):
    """Estimate too high (shared backward work): the search uses the room; too low: it repairs to fit."""
    options = synthetic_options(1)
    budget = BASE_PEAK + 300
    exact = additive_peak(options)
    found = search.search(options, BASE_PEAK, budget, lambda s: exact(s, extra), max_plans=200)[0]
    assert found.peak_sram_bytes == exact(found.scheme, extra) <= budget
    assert found.gain == pytest.approx(brute_force(options, lambda chosen: BASE_PEAK + int(sum(o.cost for o in chosen) * extra) <= budget))


def test_repair_drops_least_gain_per_byte_until_it_fits():
    options = [search.Option("bias", 2, 0.05, 100), search.Option(3, 1.0, 0.01, 100), search.Option(4, 0.5, 0.04, 50)]
    calls = []

    def exact(scheme):  # every combination is 30 % over its estimate, and planning is counted
        calls.append(scheme)
        return additive_peak(options)(scheme, 1.3)

    found = search.search(options, BASE_PEAK, BASE_PEAK + 250, exact, max_plans=1, smaller=())[0]
    assert found.peak_sram_bytes <= BASE_PEAK + 250
    assert {o.group for o in found.chosen} == {"bias", 4}  # conv 3 (0.0001 gain per byte) went first
    assert found.scheme == SparseScheme(2, (4,), (0.5,))


def test_budget_below_the_classifier_alone_gives_the_minimum():
    with pytest.raises(TinyTrainError, match=r"budget: 999 bytes .* the classifier alone \(bias-only:0\): 1000 bytes \(1.0 KB\)"):
        search.search(synthetic_options(0), BASE_PEAK, BASE_PEAK - 1, additive_peak(synthetic_options(0)))


def fake_finetune(model_path, scheme, settings):
    """A stand-in fine-tune: accuracy grows with what the scheme trains; peak 1000 + 10 per bias + 100 x ratio per weight."""
    acc = 0.5 + 0.01 * scheme.n_bias_update + 0.03 * sum(scheme.weight_ratio)
    return {"accuracy": acc, "accuracies": [acc], "peak_sram_bytes": 1000 + 10 * scheme.n_bias_update + int(100 * sum(scheme.weight_ratio))}


def test_analysis_cache_resumes_after_an_interrupt(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    schemes = search.candidates(6, 2, (0.5, 1.0))
    assert len(schemes) == 1 + 6 + 4 and schemes[0] == search.BASE
    settings = search.Finetune("digits:5-9", 5)
    calls = []

    def interrupted(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[1])
        return fake_finetune(*args)

    with pytest.raises(KeyboardInterrupt):
        search.analyse(str(model), schemes, settings, tmp_path / "cache", run=interrupted)
    assert len(list((tmp_path / "cache").iterdir())) == 3  # only finished entries, no temporary files

    def counted(*args):
        calls.append(args[1])
        return fake_finetune(*args)

    calls.clear()
    progress = []
    results = search.analyse(str(model), schemes, settings, tmp_path / "cache", run=counted, progress=lambda *a: progress.append(a))
    assert len(calls) == len(schemes) - 3 and set(results) == set(schemes)
    assert progress[0] == (3, len(schemes), "3 cached") and progress[-1][0] == len(schemes)
    calls.clear()
    assert search.analyse(str(model), schemes, settings, tmp_path / "cache", run=counted) == results and not calls
    search.analyse(str(model), schemes[:2], search.Finetune("digits:5-9", 5, lr=0.1), tmp_path / "cache", run=counted)
    assert len(calls) == 2  # another learning rate is another experiment
    model.write_bytes(b"other model")
    calls.clear()
    search.analyse(str(model), schemes[:1], settings, tmp_path / "cache", run=counted)
    assert len(calls) == 1


def test_analysis_in_parallel_processes(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    schemes = search.candidates(3, 1, (1.0,))
    results = search.analyse(str(model), schemes, search.Finetune("digits", 10), tmp_path / "cache", jobs=2, run=fake_finetune)
    assert results == {s: fake_finetune(None, s, None) for s in schemes}


def test_finetune_scores_a_candidate_on_a_validation_split(tiny_pkl, tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 20)
    images = np.zeros((20, 3, 16, 16), np.int8)
    images[np.arange(20), labels] = 100
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    settings = search.Finetune(str(tmp_path / "d.npz"), 3, lr=0.01, repeats=1, val_fraction=0.25)
    train_x, _, val_x, _ = search.split(settings, (3, 16, 16))
    assert len(val_x) == 5 and len(train_x) == 15
    r = search.finetune(str(tiny_pkl), SparseScheme(1), settings)
    # The same fine-tuning spelled out: the split's training images in the seeded order, then the validation
    # images' predicted classes counted.
    from tvm_tinytrain.importers import load_model
    from tvm_tinytrain.trainer import Int8Trainer

    trainer = Int8Trainer(load_model(tiny_pkl), SparseScheme(1), 3, lr=0.01)
    train_x, train_y, val_x, val_y = search.split(settings, (3, 16, 16))
    order = np.random.default_rng([settings.seed, 0])
    for _ in range(settings.epochs):
        for k in order.permutation(len(train_y)):
            trainer.step(train_x[k], int(train_y[k]))
    correct = sum(int(np.argmax(trainer.predict(x))) == int(y) for x, y in zip(val_x, val_y))
    assert r["accuracies"] == [r["accuracy"]] == [correct / len(val_y)]
    assert r["peak_sram_bytes"] == trainer.memory_plan().peak_sram_bytes
    with pytest.raises(TinyTrainError, match="no validation or no training split"):
        search.split(search.Finetune(str(tmp_path / "d.npz"), 3, val_fraction=0.01), (3, 16, 16))
    for bad, message in (({"val_fraction": 1.0}, "val-fraction: 1.0 must be in"), ({"repeats": 0}, "repeats: 0 must be at least 1")):
        with pytest.raises(TinyTrainError, match=message):
            search.Finetune(str(tmp_path / "d.npz"), 3, **bad)


def test_digits_data_spec_picks_classes():
    x, y, tx, ty = load_data("digits:5-9", INPUT_SHAPE, 5)
    t = task(TARGET_CLASSES)
    np.testing.assert_array_equal(x, t.train_x)
    np.testing.assert_array_equal(y, t.train_y)
    assert set(ty) == set(range(5)) and len(tx) == len(t.test_x)
    _, y2, _, _ = load_data("digits:9,1", INPUT_SHAPE, 2)
    assert set(y2) == {0, 1}
    for bad in ("digits:5-", "digits:3,3", "digits:8-12"):
        with pytest.raises(TinyTrainError, match="expected digits:LO-HI"):
            load_data(bad, INPUT_SHAPE, 5)
    with pytest.raises(TinyTrainError, match="has 5 classes; the head has only 3"):
        load_data("digits:5-9", INPUT_SHAPE, 3)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_search_cli_end_to_end(capsys, tiny_pkl, tmp_path, monkeypatch):
    """Fine-tuning stood in (fake gains), exact peaks real: the scheme fits the budget by the planner and reruns hit the cache."""
    from relax_passes import memory_plan
    from tvm_tinytrain.importers import load_model
    from tvm_tinytrain.trainer import build_training_module

    model = load_model(tiny_pkl)

    def planned(model_path, scheme, settings):
        acc = 0.5 + 0.01 * scheme.n_bias_update + 0.03 * sum(scheme.weight_ratio)
        return {"accuracy": acc, "accuracies": [acc], "peak_sram_bytes": memory_plan(build_training_module(model, scheme, 3)).peak_sram_bytes}

    monkeypatch.setattr(search, "finetune", planned)
    np.savez(tmp_path / "d.npz", images=np.zeros((10, 3, 16, 16), np.int8), labels=np.arange(10) % 3)
    out = tmp_path / "scheme.json"
    args = ["search", tiny_pkl, "--data", tmp_path / "d.npz", "--num-classes", "3", "--budget", "8KB", "-o", out,
            "--weight-convs", "1", "--ratios", "0.5,1", "--jobs", "1", "--max-plans", "4"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "contribution analysis" in err and "7/7" in err and "measuring the best combinations" in err and "exact peak SRAM" in stdout
    record = json.loads(out.read_text())
    assert record["validation_accuracy"] == max(m["validation_accuracy"] for m in record["measured"])
    assert record["peak_sram_bytes"] <= 8 * 1024 and record["predicted_gain"] > 0 and len(record["contributions"]) == 6
    scheme = parse_scheme(str(out), model)
    assert (scheme.n_bias_update, list(scheme.weight_idx)) == (record["n_bias_update"], record["weight_idx"])
    code, stdout, _ = run_cli(capsys, "memory", tiny_pkl, "--scheme", out, "--num-classes", "3", "--json")
    assert json.loads(stdout)["peak_sram_bytes"] == record["peak_sram_bytes"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "7 cached" in err and (tmp_path / "scheme.json.cache").is_dir()


@pytest.mark.parametrize("arrays, extra, message", [
    ({"images": np.zeros((4, 3, 15, 16), np.int8), "labels": np.zeros(4, int)}, [], r"'images' must be int8 \(N, 3, 16, 16\)"),
    ({"images": np.zeros((4, 3, 16, 16), np.int8), "labels": np.array([0, 1, 2, 7])}, [], r"'labels' must be in \[0, 2\], found 0..7"),
    ({"images": np.zeros((10, 3, 16, 16), np.int8), "labels": np.zeros(10, int)}, ["--budget", "1KB"],
     r"budget: 1024 bytes \(1.0 KB\) is below the smallest possible training step, the classifier alone \(bias-only:0\): \d+ bytes"),
    ({"images": np.zeros((10, 3, 16, 16), np.int8), "labels": np.zeros(10, int)}, ["--weight-convs", "9"], r"weight-convs: 9 must be in \[0, 4\]"),
])
def test_search_cli_errors(capsys, tiny_pkl, tmp_path, arrays, extra, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    code, _, err = run_cli(capsys, "search", tiny_pkl, "--data", tmp_path / "bad.npz", "--num-classes", "3", "--budget", "100KB",
                           "-o", tmp_path / "s.json", *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(message, err)
    with pytest.raises(SystemExit):
        main(["search", str(tiny_pkl), "--budget", "lots", "-o", str(tmp_path / "s.json")])
