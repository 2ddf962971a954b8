"""The trainer survives kill -9, resuming bit for bit: a tiny V-MoE on the embedded digits in a
subprocess (train_runs.run) with the aux-loss-free router (its state too), orbax checkpoints on
disk, SIGKILL sent by the process to itself while a checkpoint is written. Repeated kills at
random moments, with flaky storage: `nox -s faults` (test_faults.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from train_runs import leaves, run

import vmoe_train

pytestmark = pytest.mark.slow


# The aux-loss-free router (plugin vmoe-router-aux-free): its balancing bias is state that each
# step updates, so a resume that lost or repeated an update would show. test_faults.py kills the
# default top-K router's runs.
AUX_FREE = (
    "--set",
    "model.moe.router=aux_free",
    "--set",
    "model.moe.router_options.bias_rate=0.01",
)


def test_kill_9_while_a_checkpoint_is_written_then_resume_is_bit_identical(tmp_path):
    # One kill, right after an async checkpoint write began (the worker logs, and can die, at
    # even steps; checkpoints every 4 steps of 24). Repeated kills at random moments, with
    # flaky storage: `nox -s faults` (test_faults.py).
    # The three runs compile the same programs: the later two read them from XLA's persistent
    # cache (the same executables, so bit-identity is still the trainer's alone).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache")}
    straight = tmp_path / "straight"
    run(straight, *AUX_FREE, env=cache)
    killed = tmp_path / "killed"
    run(
        killed,
        *AUX_FREE,
        "--kill-at-checkpoint",
        str(random.Random(20261129).choice([8, 12, 16])),
        killed=True,
        env=cache,
    )
    resumed = run(killed, *AUX_FREE, env=cache)
    assert "resumed from" in resumed.stdout

    a = leaves(vmoe_train.restore_params(straight / "checkpoints"))
    b = leaves(vmoe_train.restore_params(killed / "checkpoints"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # The router state too, at the end and at every checkpoint both runs kept.
    for step in (4, 8, 12, 16, 20, 24):
        bias_a = leaves(vmoe_train.checkpoints.restore_router_state(straight / "checkpoints", step))
        bias_b = leaves(vmoe_train.checkpoints.restore_router_state(killed / "checkpoints", step))
        assert bias_a.keys() == bias_b.keys() and bias_a, step
        for key in bias_a:
            np.testing.assert_array_equal(bias_a[key], bias_b[key], err_msg=f"{step} {key}")
    assert any(np.abs(v).max() > 0 for v in bias_a.values())  # it moved

    # No batch lost or seen twice: every checkpoint's data iterator state is its step.
    ckpt = vmoe_train.Checkpointer(killed / "checkpoints", every_steps=4, keep=10)
    for step in ckpt.steps():
        assert ckpt.data_state(step) == {"batches": step}, step
    ckpt.close()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["start_step"] >= 4
