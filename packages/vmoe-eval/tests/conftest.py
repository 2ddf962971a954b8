"""Shared test setup: the helpers next to this file are importable (pytest runs in importlib
mode), the embedded digits are built once per session into a temporary data dir
(`$VMOE_DATA_DIR`, inherited by the worker subprocesses), and one tiny V-MoE is trained once
per session for the tests that need a trained checkpoint."""

from __future__ import annotations

import os
import pathlib
import sys

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
    """(workdir, summary, EvalCallback) of a tiny V-MoE trained for TRAINED_STEPS steps, with
    checkpoints and the "evaluators" callback (accuracy) every 100 steps."""
    from eval_worker import tiny_config

    import vmoe_train
    from vmoe_eval.evaluators import EvalCallback

    workdir = tmp_path_factory.mktemp("trained")
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
    return workdir, summary, callback


@pytest.fixture(scope="session")
def trained_run(trained):
    from vmoe_eval import loading

    return loading.load_run(trained[0])
