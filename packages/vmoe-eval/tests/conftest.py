"""Shared test setup: the helpers next to this file are importable (pytest runs in importlib
mode), the embedded digits are built once per session into a temporary data dir
(`$VMOE_DATA_DIR`, inherited by the worker subprocesses), and one tiny V-MoE is trained once
per test run (shared by the pytest-xdist workers) for the tests that need a trained checkpoint."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import sys
import types

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

TRAINED_STEPS = 200  # V-MoE-Nano/4 on digits: about 30 s on 2 busy CPU cores, ~82% test accuracy


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vmoe_eval_data_dir")
    previous = os.environ.get("VMOE_DATA_DIR")
    os.environ["VMOE_DATA_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["VMOE_DATA_DIR"]
    else:
        os.environ["VMOE_DATA_DIR"] = previous


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir):
    """(workdir, summary, callback) of a tiny V-MoE trained for TRAINED_STEPS steps, with
    checkpoints and the "evaluators" callback (accuracy) every 100 steps; callback.results maps
    each evaluated step to its accuracy evaluator's results.

    Trained once per test run: under pytest-xdist the first worker to ask trains (the others
    wait on a file lock) and every worker reads the same run, its summary and the callback's
    results (JSON: Python floats round-trip exactly).
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this run's temp root, above the workers' own
    workdir, results = shared / "trained", shared / "trained-callback.json"
    with open(shared / "trained.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not results.exists():
            _train(workdir, results)
    callback = json.loads(results.read_text())
    summary = json.loads((workdir / "summary.json").read_text())
    results_by_step = {int(step): value for step, value in callback.items()}
    return workdir, summary, types.SimpleNamespace(results=results_by_step)


def _train(workdir: pathlib.Path, results: pathlib.Path) -> None:
    from eval_worker import tiny_config

    import vmoe_train
    from vmoe_eval.evaluators import EvalCallback

    config = tiny_config(
        [
            f"num_steps={TRAINED_STEPS}",
            "optimizer.warmup_steps=20",
            "checkpoint.every_steps=100",
            "eval.every_steps=100",
            "log.callbacks=('jsonl',)",
        ]
    )
    callback = EvalCallback(("accuracy",))
    summary = vmoe_train.train(config, workdir, callbacks=[callback])
    written = json.loads((workdir / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary)), "summary.json is not the returned summary"
    partial = results.with_suffix(".partial")
    partial.write_text(json.dumps(callback.results))
    partial.rename(results)  # complete or absent: a crashed training is retried, not half-read


@pytest.fixture(scope="session")
def trained_run(trained):
    from vmoe_eval import loading

    return loading.load_run(trained[0])
