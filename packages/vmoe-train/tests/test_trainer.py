"""The trainer end to end, in process: a tiny V-MoE on the embedded digits, then fine-tuned
onto another class count and resolution from its checkpoint."""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
import pytest
from PIL import Image
from train_worker import tiny_config

import vmoe_data
import vmoe_train
from vmoe_train.setup import build, build_model


class Recorder(vmoe_train.Callback):
    """The order of the hooks at evaluation steps, and what `on_evaluate`'s params give."""

    def __init__(self):
        self.calls = []
        self.evaluated = {}

    def on_step_end(self, step, metrics):
        self.calls.append(("on_step_end", step))

    def on_evaluate(self, step, variables, setup):
        self.calls.append(("on_evaluate", step))
        # The live variables: the trainer's own evaluation of them, again.
        self.evaluated[step] = vmoe_train.trainer.evaluate(setup, variables, "validation")

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


@pytest.fixture(scope="module")
def by_hand(pretrained):
    """{split: (predicted, labels, per-example losses)} of the step-24 checkpoint, computed
    here: the params read back from disk, the examples read one by one from the dataset's
    source and scaled to [-1, 1] here, the model applied in eval batches (the last one padded
    with copies of the last example: as every split has an even count, the routing groups of 2
    images never mix padding into a real image's group), the softmax cross-entropy in float64."""
    workdir, _ = pretrained
    params = vmoe_train.restore_params(workdir / "checkpoints", step=24)
    tokens = (8 // 4) ** 2 + 1  # 2x2 patches of 4x4 pixels and the class token
    model = build_model(tiny_config(), num_classes=10, group_size=2 * tokens)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    size = tiny_config().eval_batch_size
    results = {}
    for split in ("validation", "test"):
        source = vmoe_data.get_dataset("digits").source(split)
        images = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])
        labels = np.array([int(source[i]["label"]) for i in range(len(source))])
        images = images.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
        logits = []
        for start in range(0, len(images), size):
            batch = images[start : start + size]
            padded = np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])
            logits.append(np.asarray(apply(params, padded), np.float64)[: len(batch)])
        logits = np.concatenate(logits)
        top = logits.max(-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        losses = log_z - logits[np.arange(len(labels)), labels]
        results[split] = (logits.argmax(-1), labels, losses)
    return results


def _lr_by_hand(step):
    """tiny_config's schedule at optimizer update `step` (0-based): 4 warmup steps from 0 to
    5e-3, then cosine over the 20 others down to 1% of it."""
    peak, warmup, decay = 5e-3, 4, 20
    if step < warmup:
        return peak * step / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))
    return peak * (0.99 * cosine + 0.01)


def test_summary_checkpoint_and_logs(pretrained, by_hand):
    workdir, summary = pretrained
    assert summary["steps"] == 24 and summary["start_step"] == 0
    assert summary["checkpoint"] == str(workdir / "checkpoints" / "24")
    digits = vmoe_data.get_dataset("digits")
    assert summary["validation/examples"] == len(digits.source("validation")) == 180
    assert summary["test/examples"] == len(digits.source("test")) == 364
    # The final numbers are those of the checkpoint's params, recomputed here by hand.
    for split, count in (("validation", 180), ("test", 364)):
        predicted, labels, losses = by_hand[split]
        assert len(labels) == count
        correct = int(np.sum(predicted == labels))
        assert summary[f"{split}/accuracy"] == correct / count, (split, correct)
        assert summary[f"{split}/loss"] == pytest.approx(np.mean(losses), rel=1e-5), split
    assert json.loads((workdir / "summary.json").read_text()) == summary
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(2, 25, 2))
    for r in train:  # the rate of the update that step made (update step - 1)
        assert r["train/learning_rate"] == pytest.approx(_lr_by_hand(r["step"] - 1), rel=1e-6)
    for key in (
        "train/aux_loss",
        "train/accuracy",
        "train/moe_block_1/dropped_fraction",
        "train/moe_block_1/no_expert_fraction",
        "train/moe_block_1/load_cv",
        "train/moe_block_1/aux_importance",
    ):
        assert key in train[-1], key
    # A training batch of 16 images: its accuracy is a count of 16ths.
    for r in train:
        assert r["train/accuracy"] * 16 == round(r["train/accuracy"] * 16), r
    assert any("validation/accuracy" in r and r["step"] == 12 for r in records)
    final = [r for r in records if r.get("step") == 24 and "test/accuracy" in r]
    assert len(final) == 1
    for key in ("validation/accuracy", "validation/loss", "test/accuracy", "test/loss"):
        assert final[0][key] == pytest.approx(summary[key], rel=1e-6), key
    assert (workdir / "tensorboard").is_dir()
    # The checkpoint holds the config it was trained with.
    assert vmoe_train.read_config(workdir / "checkpoints")["model"]["name"] == "V-MoE-Nano/4"


def test_evaluate_counts_each_real_example_once(pretrained, by_hand):
    """`evaluate` on the first n test examples, n chosen so that the last batch is padded with
    copies of an example the model gets right: counting the padding would add hits."""
    workdir, _ = pretrained
    predicted, labels, losses = by_hand["test"]
    hits = predicted == labels
    n = max(i + 1 for i in range(len(labels)) if hits[i] and (i + 1) % 2 == 0 and (i + 1) % 64)
    setup = build(tiny_config())
    params = vmoe_train.restore_params(workdir / "checkpoints", step=24)
    result = vmoe_train.evaluate(setup, {"params": params}, f"test[:{n}]")
    assert result[f"test[:{n}]/examples"] == n
    assert result[f"test[:{n}]/accuracy"] == int(np.sum(hits[:n])) / n
    assert result[f"test[:{n}]/loss"] == pytest.approx(np.mean(losses[:n]), rel=1e-5)


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
    assert text.startswith("vmoe-train: done, 24 steps in ")
    # The printed accuracies are the summary file's, as percentages to 2 decimals.
    saved = json.loads((workdir / "summary.json").read_text())
    pattern = r"^  (\S+/accuracy): (\d+\.\d\d)% \(capacity factor ([\d.]+)\)$"
    printed = {k: (v, c) for k, v, c in re.findall(pattern, text, flags=re.MULTILINE)}
    assert set(printed) == {"validation/accuracy", "test/accuracy"}
    for key, (value, capacity) in printed.items():
        assert value == f"{100 * saved[key]:.2f}", (key, value, saved[key])
        # The capacity evaluation routed with: the router's own C here (digits_vmoe sets none).
        split = key.split("/")[0]
        assert float(capacity) == saved[f"{split}/capacity_factor"] == 1.05
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
