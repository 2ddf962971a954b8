"""Evaluators as plugins: the accuracy evaluator against the trainer's own evaluation, every
example exactly once at any batch size and across two processes, the trainer callback, and the
errors for unknown evaluators and bad options."""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import vmoe_plugins
import vmoe_train
from vmoe_eval import evaluators, loading
from vmoe_train import trainer

WORKER = pathlib.Path(__file__).with_name("eval_worker.py")
TEST_EXAMPLES = 364  # the embedded digits' test split


def test_builtins_are_registered_through_the_hook():
    assert {"accuracy", "fewshot"} <= set(evaluators.available_evaluators())
    assert "builtin" in evaluators.EVALUATORS.provider("accuracy")
    assert "evaluators" in vmoe_train.available_callbacks()
    for name in ("accuracy", "fewshot"):
        evaluator = evaluators.get_evaluator(name)
        assert evaluator.name == name and isinstance(evaluator, evaluators.Evaluator)


def test_unknown_evaluator_is_one_clear_error():
    with pytest.raises(ValueError) as error:
        evaluators.get_evaluator("acuracy")
    message = str(error.value)
    assert "unknown evaluator 'acuracy'" in message and "did you mean 'accuracy'" in message
    assert "installed: ['accuracy', 'fewshot'" in message and "\n" not in message
    with pytest.raises(ValueError, match="unknown evaluator 'nope'"):
        evaluators.EvalCallback(("accuracy", "nope"))


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['shot'\].*allowed: \['shots'"):
        evaluators.get_evaluator("fewshot", shot=5)
    with pytest.raises(ValueError, match=r"fewshot: shots=0 must be an integer >= 1"):
        evaluators.get_evaluator("fewshot", shots=(0, 5))
    with pytest.raises(ValueError, match=r"accuracy: capacity_factor=-1 must be"):
        evaluators.get_evaluator("accuracy", capacity_factor=-1)
    with pytest.raises(ValueError, match="not the string"):
        evaluators.make_evaluators("accuracy")


def test_a_plugin_evaluator_is_found_and_checked():
    class Constant:
        name = "constant"

        def __init__(self, value=1.0):
            self.value = value

        def evaluate(self, run):
            return {"constant/value": self.value}

    class Plugin:
        @vmoe_plugins.hookimpl
        def vmoe_evaluators(self):
            return {"constant": Constant, "broken": object}

    name = vmoe_plugins.register_plugin(Plugin(), name="test-evaluators")
    try:
        assert "constant" in evaluators.available_evaluators()
        built = evaluators.make_evaluators([("constant", {"value": 2.0}), {"name": "constant"}])
        assert [e.evaluate(None) for e in built] == [{"constant/value": v} for v in (2.0, 1.0)]
        with pytest.raises(ValueError, match=r"evaluator 'broken' from test-evaluators"):
            evaluators.get_evaluator("broken")
    finally:
        vmoe_plugins.unregister_plugin(name)
    assert "constant" not in evaluators.available_evaluators()


def test_callback_reads_config_eval_evaluators():
    def info(config):
        return vmoe_train.RunInfo(pathlib.Path("."), config, 0, 10)

    plain = ml_collections.ConfigDict({"eval": {"every_steps": 5}})
    assert evaluators.EvalCallback.from_run(info(plain)).evaluators == []
    named = ml_collections.ConfigDict(
        {"eval": {"every_steps": 5, "evaluators": ("accuracy", ("fewshot", {"shots": (5,)}))}}
    )
    callback = evaluators.EvalCallback.from_run(info(named))
    assert [e.name for e in callback.evaluators] == ["accuracy", "fewshot"]
    assert callback.evaluators[1].shots == (5,)
    callback.on_train_start(info(named))
    assert callback.every_steps == 5


def test_accuracy_equals_the_trainers_evaluation(trained_run):
    run = trained_run
    results = evaluators.get_evaluator("accuracy").evaluate(run)
    assert sorted(results) == [
        "test/accuracy",
        "test/examples",
        "validation/accuracy",
        "validation/examples",
    ]
    for split in ("validation", "test"):
        expected = trainer.evaluate(run.setup, run.variables, split)
        assert results[f"{split}/accuracy"] == expected[f"{split}/accuracy"]  # exactly
        assert results[f"{split}/examples"] == expected[f"{split}/examples"]
    assert results["test/examples"] == TEST_EXAMPLES and results["test/accuracy"] > 0.6


@pytest.mark.parametrize("batch_size", [50, 22])  # neither divides 364
def test_accuracy_counts_every_example_once_at_any_batch_size(trained_run, batch_size):
    default = evaluators.get_evaluator("accuracy", split="test").evaluate(trained_run)
    other = evaluators.get_evaluator("accuracy", split="test", batch_size=batch_size)
    assert other.evaluate(trained_run) == default
    ids = []
    for _, batch in loading.forward(trained_run, "test", batch_size=batch_size):
        ids += np.asarray(batch["id"])[np.asarray(batch["mask"], bool)].tolist()
    assert len(ids) == TEST_EXAMPLES == len(set(ids))


def test_batch_size_that_splits_a_routing_group_is_a_clear_error(trained_run):
    with pytest.raises(ValueError, match=r"batch_size=51: .* a multiple of 2"):
        evaluators.get_evaluator("accuracy", batch_size=51).evaluate(trained_run)


def test_callback_evaluates_the_trainers_params_as_their_checkpoints(trained):
    workdir, summary, callback = trained
    assert sorted(callback.results) == [100, 200]
    written = {int(p.stem): json.loads(p.read_text()) for p in (workdir / "eval").glob("*.json")}
    assert sorted(written) == [100, 200]
    final = written[200]
    assert final["step"] == 200
    # The trainer's final evaluation and the callback's accuracy evaluator: the same numbers.
    for key in ("validation/accuracy", "test/accuracy", "test/examples"):
        assert final[key] == summary[key], key
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in records if r.get("step") == 100 and "validation/accuracy" in r]
    assert written[100]["validation/accuracy"] == periodic[0]["validation/accuracy"]
    # The live params give what the step's checkpoint, loaded from disk, gives: exactly.
    accuracy = evaluators.get_evaluator("accuracy")
    for step in (100, 200):
        saved = accuracy.evaluate(loading.load_run(workdir, step=step))
        assert callback.results[step] == saved, step
        assert written[step] == {"step": step, **saved}


def test_eval_evaluators_run_on_live_params_without_reading_a_checkpoint(tmp_path, monkeypatch):
    """`eval.evaluators` set, `log.callbacks` without "evaluators": the trainer uses the
    callback anyway, which evaluates the params in memory at every evaluation step, also one
    without a checkpoint (step 12), never loading one; the final step's results are exactly
    those of its checkpoint loaded from disk, step 12's accuracy the trainer's own."""
    from eval_worker import tiny_config

    config = tiny_config(
        [
            "eval.every_steps=12",
            "checkpoint.every_steps=0",  # only the final step is saved
            "checkpoint.async_save=True",
            "eval.evaluators=('accuracy',)",
            "log.callbacks=('jsonl',)",
        ]
    )
    loads = []
    load_run = loading.load_run
    monkeypatch.setattr(loading, "load_run", lambda *a, **k: loads.append(a) or load_run(*a, **k))
    summary = vmoe_train.train(config, tmp_path)
    monkeypatch.undo()
    assert loads == []
    assert not (tmp_path / "checkpoints" / "12").exists()
    assert (tmp_path / "checkpoints" / "24").is_dir()
    written = {int(p.stem): json.loads(p.read_text()) for p in (tmp_path / "eval").glob("*.json")}
    assert sorted(written) == [12, 24]
    saved = evaluators.get_evaluator("accuracy").evaluate(loading.load_run(tmp_path, step=24))
    assert written[24] == {"step": 24, **saved}
    assert written[24]["test/accuracy"] == summary["test/accuracy"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    [periodic] = [r for r in records if r.get("step") == 12 and "validation/accuracy" in r]
    assert written[12]["validation/accuracy"] == periodic["validation/accuracy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_count_every_example_once(trained, trained_run, tmp_path):
    """Two processes (one CPU device each, jax.distributed on 127.0.0.1, gloo collectives)
    evaluate the trained checkpoint at a global batch of 50 (8 batches, the last one padded):
    each process reports all 364 test examples once and the one-process accuracy."""
    workdir = trained[0]
    checkpoint = workdir / "checkpoints"
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(checkpoint),
                str(tmp_path / f"process{i}.json"),
                "--batch-size=50",
                f"--coordinator={address}",
                "--num-processes=2",
                f"--process-id={i}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    one = evaluators.get_evaluator("accuracy", split="test", batch_size=50).evaluate(trained_run)
    source = trained_run.dataset.source("test")
    test_ids = sorted(int(source[i]["id"]) for i in range(TEST_EXAMPLES))
    for i in range(2):
        record = json.loads((tmp_path / f"process{i}.json").read_text())
        assert record["process"] == i
        assert record["results"] == one
        assert record["results"]["test/examples"] == TEST_EXAMPLES
        assert sorted(record["ids"]) == test_ids  # each test example exactly once
