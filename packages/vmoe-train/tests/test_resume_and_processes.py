"""The trainer survives kill -9 (resuming bit for bit) and runs across processes.

Each run is a real subprocess (tests/train_worker.py): a tiny V-MoE on the embedded digits,
orbax checkpoints on disk, SIGKILL sent by the process to itself at chosen steps.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import vmoe_train

WORKER = pathlib.Path(__file__).with_name("train_worker.py")
pytestmark = pytest.mark.slow


def _run(workdir, *args, killed=False, timeout=600, env=None):
    result = subprocess.run(
        [sys.executable, str(WORKER), str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if killed:
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _leaves(tree):
    import jax

    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_kill_9_while_a_checkpoint_is_written_then_resume_is_bit_identical(tmp_path):
    # One kill, right after an async checkpoint write began (the worker logs, and can die, at
    # even steps; checkpoints every 4 steps of 24). Repeated kills at random moments, with
    # flaky storage: `nox -s faults` (test_faults.py).
    # The three runs compile the same programs: the later two read them from XLA's persistent
    # cache (the same executables, so bit-identity is still the trainer's alone).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache")}
    straight = tmp_path / "straight"
    _run(straight, env=cache)
    killed = tmp_path / "killed"
    _run(
        killed,
        "--kill-at-checkpoint",
        str(random.Random(20261129).choice([8, 12, 16])),
        killed=True,
        env=cache,
    )
    resumed = _run(killed, env=cache)
    assert "resumed from" in resumed.stdout

    a = _leaves(vmoe_train.restore_params(straight / "checkpoints"))
    b = _leaves(vmoe_train.restore_params(killed / "checkpoints"))
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


def _losses(workdir) -> dict[int, float]:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_follow_the_loss_curve_of_one(tmp_path):
    # Deterministic routing and no dropout: the global batch is laid out in another order across
    # two processes, and the noise/dropout draws follow positions, not examples.
    common = [
        "--set", "model.dropout_rate=0.0",
        "--set", "model.moe.router_options.noise_std=0.0",
        "--set", "model.moe.router_options.load_loss_weight=0.0",
        "--set", "model.moe.group_images=1",
        "--set", "num_steps=6",
        "--set", "checkpoint.every_steps=0",
    ]  # fmt: skip
    _run(tmp_path / "one", *common)
    _two_processes(tmp_path / "two", *common)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [2, 4, 6]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step


EXTRA = pytest.mark.skipif(
    os.environ.get("VMOE_TRAIN_EXTRA") != "1",
    reason="an extra multi-process/multi-device case: `nox -s faults` (VMOE_TRAIN_EXTRA=1)",
)


@EXTRA
def test_fine_tuning_across_two_processes_reads_each_processs_slices(tmp_path):
    # Experts split over both processes: each process reads only its slices of the loaded
    # parameters (was: jax.device_get of parameters no process holds whole: an error).
    common = ["--set", "num_steps=6", "--set", "checkpoint.every_steps=0"]
    _run(tmp_path / "one", *common)
    outs = _two_processes(
        tmp_path / "finetuned",
        *common,
        "--set", "sharding.strategy=expert",
        "--set", f"finetune.init_from={tmp_path / 'one' / 'checkpoints' / '6'}",
        "--set", "num_steps=2",
        "--set", "optimizer.warmup_steps=0",
    )  # fmt: skip
    assert all("fine-tuning from" in out for out in outs[:1])
    assert sorted(_losses(tmp_path / "finetuned")) == [2]


@EXTRA
def test_two_processes_resume_as_one_decision_past_a_corrupt_checkpoint(tmp_path):
    # Checkpoints at 2 and 4; step 4's array data truncated (corrupt for both processes): both
    # restore step 2 together, process 0 moves step 4 aside, and the run ends at 6 in both.
    common = ["--set", "num_steps=4", "--set", "checkpoint.every_steps=2"]
    _two_processes(tmp_path / "run", *common)
    for data in (tmp_path / "run" / "checkpoints" / "4" / "state").rglob("*"):
        if data.is_file() and data.parent.name == "d":
            data.write_bytes(b"")
    allow = ["--set", "resume.allow_changes=num_steps"]
    outs = _two_processes(tmp_path / "run", *common, "--set", "num_steps=6", *allow)
    assert "resumed from" in outs[0] and f"{tmp_path / 'run' / 'checkpoints' / '2'}" in outs[0]
    assert (tmp_path / "run" / "checkpoints.corrupt" / "4" / "state").is_dir()
    assert sorted(
        vmoe_train.Checkpointer(tmp_path / "run" / "checkpoints", every_steps=0, keep=0).steps()
    ) == [2, 4, 6]


def _two_processes(workdir, *args) -> list[str]:
    """train_worker.py in two processes of one jax.distributed run; their stdouts."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(workdir),
                *args,
                "--set",
                f"distributed.coordinator_address={address}",
                "--set",
                "distributed.num_processes=2",
                "--set",
                f"distributed.process_id={i}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


@EXTRA
def test_expert_strategy_on_8_devices_follows_one_device(tmp_path):
    # Experts split over 8 host devices (all-to-all inside shard_map) against all experts on one
    # device: the same model, batches and routing groups, so the same loss curve.
    common = [
        "--set", "model.moe.num_experts=8",
        "--set", "model.dropout_rate=0.0",
        "--set", "num_steps=6",
        "--set", "checkpoint.every_steps=0",
    ]  # fmt: skip
    _run(tmp_path / "one", *common)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            str(tmp_path / "eight"),
            *common,
            "--set",
            "sharding.strategy=expert",
            "--set",
            "sharding.mesh_shape=(1, 8)",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert sorted(one) == sorted(eight) == [2, 4, 6]
    for step in one:
        assert eight[step] == pytest.approx(one[step], rel=1e-4), step
    config = vmoe_train.read_config(tmp_path / "eight" / "checkpoints")
    assert config["sharding"]["strategy"] == "expert"
