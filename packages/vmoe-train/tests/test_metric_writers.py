"""JsonlWriter and TensorBoardWriter: what they write reads back (TensorBoard: its own reader)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vmoe_train.metric_writers import JsonlWriter, TensorBoardWriter


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_scalars(logdir):
    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    return accumulator


def test_jsonl_lines_hold_step_time_and_metrics(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    before = time.time()
    with JsonlWriter(path) as writer:
        writer.write_scalars(1, {"train/loss": 2.5, "train/moe_block_1/no_expert_fraction": 0.0})
        writer.write_scalars(
            2, {"train/loss": float("nan"), "train/learning_rate": np.float32(0.5)}
        )
        writer.write({"summary": {"validation/accuracy": np.float64(0.75), "steps": np.int64(2)}})
    lines = read_jsonl(path)
    assert [line.get("step") for line in lines] == [1, 2, None]
    assert lines[0]["train/loss"] == 2.5
    assert lines[0]["train/moe_block_1/no_expert_fraction"] == 0.0
    assert math.isnan(lines[1]["train/loss"])  # written as it is
    assert lines[1]["train/learning_rate"] == 0.5
    assert all(before <= line["time"] <= time.time() for line in lines[:2])
    assert lines[2] == {"summary": {"validation/accuracy": 0.75, "steps": 2}}


def test_jsonl_flushes_every_line_and_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path)
    writer.write_scalars(10, {"train/loss": 1.0})
    assert [line["step"] for line in read_jsonl(path)] == [10]  # on disk before close
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write_scalars(11, {"train/loss": 1.0})
    with JsonlWriter(path) as again:  # a resumed run continues the file
        again.write_scalars(11, {"train/loss": 0.5})
    assert [line["step"] for line in read_jsonl(path)] == [10, 11]


def test_jsonl_refuses_metrics_named_like_its_own_fields(tmp_path):
    with JsonlWriter(tmp_path / "m.jsonl") as writer, pytest.raises(ValueError, match="step"):
        writer.write_scalars(1, {"step": 3.0})


def test_tensorboard_scalars_read_back_with_steps_and_float32_values(tmp_path):
    losses = {1: 2.302585092994046, 2: 1.1, 3: float("nan"), 4: 1e-7}
    with TensorBoardWriter(tmp_path / "tb") as writer:
        for step, loss in losses.items():
            writer.write_scalars(step, {"train/loss": loss, "train/learning_rate": step * 1e-3})
        writer.write_scalars(4, {"validation/accuracy": np.float64(0.8125)})
        writer.write_scalars(5, {})  # nothing to write
    accumulator = read_scalars(tmp_path / "tb")
    assert sorted(accumulator.Tags()["scalars"]) == [
        "train/learning_rate",
        "train/loss",
        "validation/accuracy",
    ]
    events = accumulator.Scalars("train/loss")
    assert [e.step for e in events] == list(losses)
    for event, loss in zip(events, losses.values(), strict=True):
        if math.isnan(loss):
            assert math.isnan(event.value)  # NaN is information: written as it is
        else:
            assert event.value == float(np.float32(loss))
    [accuracy] = accumulator.Scalars("validation/accuracy")
    assert (accuracy.step, accuracy.value) == (4, 0.8125)


def test_tensorboard_flush_makes_scalars_readable_before_close(tmp_path):
    writer = TensorBoardWriter(tmp_path, flush_secs=3600)
    writer.write_scalars(7, {"train/loss": 0.25})
    writer.flush()
    assert [(e.step, e.value) for e in read_scalars(tmp_path).Scalars("train/loss")] == [(7, 0.25)]
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write_scalars(8, {"train/loss": 0.25})


def test_tensorboard_refuses_a_value_that_is_not_a_number(tmp_path):
    with (
        TensorBoardWriter(tmp_path) as writer,
        pytest.raises(TypeError, match="'train/name' is not a number"),
    ):
        writer.write_scalars(1, {"train/name": "abc"})
