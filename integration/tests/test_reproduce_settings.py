"""reproduce/run.py's run settings: every experiment's config is valid (on the digits and on an
image folder), transfer runs keep half the classes with a matching onehot, fine-tuning starts
from the same seed's pre-trained run, the equal-time twin's steps follow the measured speeds."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

import vmoe_train as vt

ROOT = pathlib.Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "reproduce"))
spec = importlib.util.spec_from_file_location("reproduce_run", ROOT / "reproduce" / "run.py")
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)
experiments = run.experiments


def _log_speeds(workdir: pathlib.Path, speeds: list[float]) -> None:
    workdir.mkdir(parents=True)
    rows = [{"step": 25 * (i + 1), "train/images_per_second": s} for i, s in enumerate(speeds)]
    rows.append({"summary": {"steps": 25 * len(speeds)}})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _settings(name, runs, overrides=(), seed=1, steps=2000):
    return run.run_settings(experiments.TRAININGS[name], seed, steps, runs, list(overrides))


@pytest.fixture
def runs(tmp_path):
    runs = tmp_path / "runs"
    # compilation makes the first window slow; the median ignores it
    _log_speeds(runs / "vit" / "seed1", [100.0, 3000.0, 3100.0, 2900.0])
    _log_speeds(runs / "vmoe_top_k" / "seed1", [50.0, 2000.0, 2000.0, 2100.0])
    return runs


def test_every_experiment_config_is_valid(runs):
    for name, training in experiments.TRAININGS.items():
        config = vt.apply_overrides(vt.load_config(training.config), _settings(name, runs))
        vt.validate_config(config)  # raises ConfigError listing every problem


def test_transfer_runs_keep_half_the_classes_and_fine_tune_from_the_same_seed(runs):
    settings = _settings("vmoe_finetuned", runs)
    assert "dataset.classes=(5, 6, 7, 8, 9)" in settings
    assert "pp.train=decode|inception_crop(8, 70)|value_range(-1, 1)|onehot(5)" in settings
    assert f"finetune.init_from={runs / 'vmoe_first_half' / 'seed1'}" in settings
    assert "num_steps=500" in settings
    assert "dataset.classes=(0, 1, 2, 3, 4)" in _settings("vit_first_half", runs)
    assert run._with_needs_first(["vmoe_finetuned", "vit_equal_time"]) == [
        "vmoe_first_half",
        "vmoe_finetuned",
        "vit",
        "vmoe_top_k",
        "vit_equal_time",
    ]


def test_equal_time_steps_scale_with_the_measured_speeds(runs):
    # median speeds: ViT 3000 images/s, V-MoE 2000: the ViT gets 1.5x the steps
    assert "num_steps=3000" in _settings("vit_equal_time", runs)
    assert "num_steps=300" in _settings("vit_equal_time", runs, steps=200)


def test_every_experiment_runs_on_an_image_folder_by_one_flag(tmp_path, runs):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for c in range(4):
            folder = tmp_path / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (12 + i % 3, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    overrides = experiments.dataset_overrides(f"image_folder:{tmp_path / 'images'}", 8)
    assert "dataset.eval_splits=()" in overrides  # no validation split there
    for name, training in experiments.TRAININGS.items():
        settings = _settings(name, runs, overrides)
        config = vt.apply_overrides(vt.load_config(training.config), settings)
        vt.validate_config(config)
        if training.classes == "second":
            assert "dataset.classes=(2, 3)" in settings
            assert any(s.endswith("onehot(2)") for s in settings)


def test_a_dataset_without_a_test_split_is_refused(tmp_path):
    from PIL import Image

    for c in range(2):
        (tmp_path / "flat" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / f"c{c}" / "0.png")
    with pytest.raises(ValueError, match=r"missing: \['test'\]"):
        experiments.dataset_overrides(f"image_folder:{tmp_path / 'flat'}", 8)


def test_a_resumed_runs_training_curve_counts_each_step_once(tmp_path):
    """A run killed after step 50 and resumed from step 0 logs steps 25 and 50 twice."""

    def row(step, cv):
        return {
            "step": step,
            "train/moe_block_1/load_cv": cv,
            "train/moe_block_3/load_cv": cv + 0.2,
            "train/moe_block_1/dropped_fraction": 0.1,
            "train/moe_block_3/dropped_fraction": 0.3,
        }

    rows = [row(25, 0.5), row(50, 0.4), {"validation/accuracy": 0.9, "step": 50}]
    rows += [row(25, 0.5), row(50, 0.4), row(75, 0.3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = run.training_curve(path)
    assert curve["step"] == [25, 50, 75]
    assert curve["load_cv"] == pytest.approx([0.6, 0.5, 0.4])
    assert curve["dropped_fraction"] == pytest.approx([0.2, 0.2, 0.2])
