"""The experiment scripts' shared loop: same order for the same seed, every image once per epoch, accumulation flushed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tvm_tinytrain.default_model import Task, load_default_model
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.experiments import Arm, adaptation_task, fit, float_trainable, summarize
from tvm_tinytrain.trainer import Int8Trainer


class Recorder:
    """Stands in for an int8 trainer: records the images it is stepped on."""

    def __init__(self):
        self.seen, self.flushed = [], 0

    def step(self, image, label):
        self.seen.append(int(image[0, 0, 0]))
        return 0.5

    def flush(self):
        self.flushed += 1

    def evaluate(self, images, labels):
        return 1.0


def toy_task(n=7) -> Task:
    x = np.zeros((n, 1, 2, 2), np.int8)
    x[:, 0, 0, 0] = np.arange(n)
    return Task((0, 1), x, np.arange(n) % 2, x[:2], np.arange(2))


def test_fit_visits_each_image_once_per_epoch_in_a_seeded_order():
    a, b, c = Recorder(), Recorder(), Recorder()
    out = fit(a, toy_task(), epochs=2, seed=3)
    fit(b, toy_task(), epochs=2, seed=3)
    fit(c, toy_task(), epochs=2, seed=4)
    assert a.seen == b.seen != c.seen
    assert sorted(a.seen[:7]) == sorted(a.seen[7:]) == list(range(7))
    assert a.flushed == 1
    assert out["steps"] == 14 and out["accuracy"] == 1.0 and out["last_epoch_loss"] == 0.5


def test_summarize_and_float_trainable(tmp_path):
    s = summarize([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["min"] == 0.5 and s["max"] == 0.9 and s["std"] == pytest.approx(np.std([0.5, 0.7, 0.9]))
    model = load_default_model()
    assert float_trainable(model, "bias-only:1") == ["classifier_weight", "classifier_bias", "block4_project_bias"]
    assert set(float_trainable(model, "last-k:2")) == {"classifier_weight", "classifier_bias", "block4_dw_bias", "block4_dw_weight",
                                                        "block4_project_bias", "block4_project_weight"}
    half = tmp_path / "half.json"
    half.write_text(json.dumps({"n_bias_update": 1, "weight_idx": [12], "weight_ratio": [0.5]}))
    with pytest.raises(TinyTrainError, match="whole weights only"):
        float_trainable(model, str(half))


def test_an_int8_arm_rerun_equals_a_fresh_trainer_of_that_seed():
    """The arm compiles once and resets between runs: seed 1 after seed 0 must give what a new trainer with head_seed 1 gives."""
    model, full = load_default_model(), adaptation_task()
    small = Task(full.classes, full.train_x[:24], full.train_y[:24], full.test_x[:8], full.test_y[:8])
    arm = Arm("int8+qas", model, small, "last-k:1")
    arm.run(0.05, seed=0, epochs=1)
    again = arm.run(0.02, seed=1, epochs=1)
    fresh = Int8Trainer(model, "last-k:1", num_classes=5, lr=0.02, head_seed=1)
    assert fit(fresh, small, epochs=1, seed=1)["accuracy"] == again["accuracy"]
    assert again["changed_backbone_values"] > 0 and again["peak_sram_bytes"] == fresh.memory_plan().peak_sram_bytes
    for name, value in fresh.params.items():
        np.testing.assert_array_equal(arm._int8.params[name], value, err_msg=name)
