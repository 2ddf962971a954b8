"""The trainer survives kill -9, resuming bit for bit: a tiny V-MoE on the embedded digits in a
subprocess (train_runs.run), orbax checkpoints on disk, SIGKILL sent by the process to itself
while a checkpoint is written. Repeated kills at random moments, with flaky storage: `nox -s
faults` (test_faults.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from train_runs import leaves, run

import vmoe_train

pytestmark = pytest.mark.slow


def test_kill_9_while_a_checkpoint_is_written_then_resume_is_bit_identical(tmp_path):
    # One kill, right after an async checkpoint write began (the worker logs, and can die, at
    # even steps; checkpoints every 4 steps of 24). Repeated kills at random moments, with
    # flaky storage: `nox -s faults` (test_faults.py).
    # The three runs compile the same programs: the later two read them from XLA's persistent
    # cache (the same executables, so bit-identity is still the trainer's alone).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache")}
    straight = tmp_path / "straight"
    run(straight, env=cache)
    killed = tmp_path / "killed"
    run(
        killed,
        "--kill-at-checkpoint",
        str(random.Random(20261129).choice([8, 12, 16])),
        killed=True,
        env=cache,
    )
    resumed = run(killed, env=cache)
    assert "resumed from" in resumed.stdout

    a = leaves(vmoe_train.restore_params(straight / "checkpoints"))
    b = leaves(vmoe_train.restore_params(killed / "checkpoints"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # No batch lost or seen twice: every checkpoint's data iterator state is its step.
    ckpt = vmoe_train.Checkpointer(killed / "checkpoints", every_steps=4, keep=10)
    for step in ckpt.steps():
        assert ckpt.data_state(step) == {"batches": step}, step
    ckpt.close()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["start_step"] >= 4
