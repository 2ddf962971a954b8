"""The trainer end to end, in process: a tiny V-MoE on the embedded digits, then fine-tuned
onto another class count and resolution from its checkpoint."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image
from train_worker import tiny_config

import vmoe_data
import vmoe_train


class Recorder(vmoe_train.Callback):
    """The order of the hooks at evaluation steps, and what `on_evaluate`'s params give."""

    def __init__(self):
        self.calls = []
        self.evaluated = {}

    def on_step_end(self, step, metrics):
        self.calls.append(("on_step_end", step))

    def on_evaluate(self, step, params, setup):
        self.calls.append(("on_evaluate", step))
        # The live params: the trainer's own evaluation of them, again.
        self.evaluated[step] = vmoe_train.trainer.evaluate(setup, params, "validation")

    def on_eval(self, step, results):
        self.calls.append(("on_eval", step))

    def on_checkpoint(self, step, path):
        self.calls.append(("on_checkpoint", step))


@pytest.fixture(scope="module")
def recorder():
    return Recorder()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, recorder):
    workdir = tmp_path_factory.mktemp("pretrain")
    config = tiny_config(["log.callbacks=('jsonl', 'tensorboard')", "eval.every_steps=12"])
    summary = vmoe_train.train(config, workdir, callbacks=[recorder])
    return workdir, summary


def test_summary_checkpoint_and_logs(pretrained):
    workdir, summary = pretrained
    assert summary["steps"] == 24 and summary["start_step"] == 0
    assert summary["checkpoint"] == str(workdir / "checkpoints" / "24")
    assert summary["validation/examples"] == 180 and summary["test/examples"] == 364
    assert 0.0 <= summary["test/accuracy"] <= 1.0
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 24
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(2, 25, 2))
    for key in (
        "train/aux_loss",
        "train/accuracy",
        "train/learning_rate",
        "train/moe_block_1/dropped_fraction",
        "train/moe_block_1/no_expert_fraction",
        "train/moe_block_1/load_cv",
        "train/moe_block_1/aux_importance",
    ):
        assert key in train[-1], key
    assert any("validation/accuracy" in r and r["step"] == 12 for r in records)
    assert (workdir / "tensorboard").is_dir()
    # The checkpoint holds the config it was trained with.
    assert vmoe_train.read_config(workdir / "checkpoints")["model"]["name"] == "V-MoE-Nano/4"


def test_loss_goes_down(pretrained):
    workdir, _ = pretrained
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def _three_class_folder(root):
    """Digits 0, 1, 2 of the embedded set as 12x12 PNGs in class folders."""
    digits = vmoe_data.get_dataset("digits")
    source = digits.source("train")
    for i in range(len(source)):
        example = source[i]
        label = int(example["label"])
        if label < 3:
            folder = root / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(example["image"][..., 0]).resize((12, 12))
            image.save(folder / f"{i}.png")
    return root


def test_finetune_onto_new_classes_and_resolution(pretrained, tmp_path):
    source_dir, _ = pretrained
    folder = _three_class_folder(tmp_path / "images")
    config = tiny_config(
        [
            f"dataset.name=image_folder:{folder}",
            "dataset.train_split=train[:80%]",
            "dataset.eval_splits=('train[80%:]',)",
            "dataset.test_split=",
            "pp.train=decode|value_range(-1, 1)|onehot(3)",
            "pp.eval=decode|value_range(-1, 1)",
            f"finetune.init_from={source_dir}",
            "optimizer.frozen=^(?!head/)",  # only the new head trains
            "num_steps=6",
            "checkpoint.every_steps=0",
        ]
    )
    workdir = tmp_path / "finetune"
    summary = vmoe_train.train(config, workdir)
    assert summary["train[80%:]/examples"] > 0

    before = vmoe_train.restore_params(source_dir / "checkpoints")
    after = vmoe_train.restore_params(workdir / "checkpoints")
    assert after["head"]["kernel"].shape == (32, 3)  # a new head for 3 classes
    assert after["pos_embedding"].shape == (1, 3 * 3 + 1, 32)  # 12x12 in 4x4 patches (was 2x2)
    assert not np.array_equal(after["head"]["kernel"], np.zeros((32, 3)))  # it trained
    frozen = jax.tree_util.tree_leaves_with_path(
        {k: v for k, v in before.items() if k not in ("head", "pos_embedding")}
    )
    for path, value in frozen:
        loaded = after
        for key in path:
            loaded = loaded[key.key]
        np.testing.assert_array_equal(loaded, value, err_msg=jax.tree_util.keystr(path))


def test_closing_summary_names_accuracies_paths_and_the_eval_report(pretrained):
    workdir, summary = pretrained
    text = vmoe_train.trainer.format_summary(summary)
    assert f"run: {workdir}" in text and f"checkpoint: {workdir}/checkpoints/24" in text
    assert "test/accuracy: " in text and "validation/accuracy: " in text
    assert f"vmoe-eval all {workdir}" in text and f"{workdir}/eval/report.md" in text


def test_callbacks_get_the_live_params_at_each_evaluation(pretrained, recorder):
    workdir, summary = pretrained
    assert "on_evaluate" in vmoe_train.callbacks.CALLBACK_MEMBERS
    at = [c for c in recorder.calls if c[1] in (12, 24)]
    assert at == [
        ("on_step_end", 12),
        ("on_evaluate", 12),
        ("on_eval", 12),
        ("on_checkpoint", 12),  # checkpoints every 4 steps
        ("on_step_end", 24),
        ("on_evaluate", 24),
        ("on_eval", 24),
        ("on_checkpoint", 24),
    ]
    assert [c[1] for c in recorder.calls if c[0] == "on_evaluate"] == [12, 24]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    [periodic] = [r for r in records if r.get("step") == 12 and "validation/accuracy" in r]
    for key in ("validation/accuracy", "validation/loss", "validation/examples"):
        assert recorder.evaluated[12][key] == periodic[key], key
        assert recorder.evaluated[24][key] == summary[key], key
