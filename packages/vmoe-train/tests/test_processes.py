"""The trainer across processes: two jax.distributed processes on localhost follow the loss
curve of one (train_runs: train_worker.py in subprocesses). The extra multi-process and 8-device
cases run in `nox -s faults` (VMOE_TRAIN_EXTRA=1)."""

from __future__ import annotations

import os

import pytest
from train_runs import losses, run, two_processes

import vmoe_train

EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"

pytestmark = pytest.mark.slow


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
    run(tmp_path / "one", *common)
    two_processes(tmp_path / "two", *common)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
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
    run(tmp_path / "one", *common)
    outs = two_processes(
        tmp_path / "finetuned",
        *common,
        "--set", "sharding.strategy=expert",
        "--set", f"finetune.init_from={tmp_path / 'one' / 'checkpoints' / '6'}",
        "--set", "num_steps=2",
        "--set", "optimizer.warmup_steps=0",
    )  # fmt: skip
    assert all("fine-tuning from" in out for out in outs[:1])
    assert sorted(losses(tmp_path / "finetuned")) == [2]


@EXTRA
def test_two_processes_resume_as_one_decision_past_a_corrupt_checkpoint(tmp_path):
    # Checkpoints at 2 and 4; step 4's array data truncated (corrupt for both processes): both
    # restore step 2 together, process 0 moves step 4 aside, and the run ends at 6 in both.
    common = ["--set", "num_steps=4", "--set", "checkpoint.every_steps=2"]
    two_processes(tmp_path / "run", *common)
    for data in (tmp_path / "run" / "checkpoints" / "4" / "state").rglob("*"):
        if data.is_file() and data.parent.name == "d":
            data.write_bytes(b"")
    allow = ["--set", "resume.allow_changes=num_steps"]
    outs = two_processes(tmp_path / "run", *common, "--set", "num_steps=6", *allow)
    assert "resumed from" in outs[0] and f"{tmp_path / 'run' / 'checkpoints' / '2'}" in outs[0]
    assert (tmp_path / "run" / "checkpoints.corrupt" / "4" / "state").is_dir()
    assert sorted(
        vmoe_train.Checkpointer(tmp_path / "run" / "checkpoints", every_steps=0, keep=0).steps()
    ) == [2, 4, 6]


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
    run(tmp_path / "one", *common)
    run(
        tmp_path / "eight",
        *common,
        "--set", "sharding.strategy=expert",
        "--set", "sharding.mesh_shape=(1, 8)",
        env={"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {EIGHT_DEVICES}"},
    )  # fmt: skip
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(one) == sorted(eight) == [2, 4, 6]
    for step in one:
        assert eight[step] == pytest.approx(one[step], rel=1e-4), step
    config = vmoe_train.read_config(tmp_path / "eight" / "checkpoints")
    assert config["sharding"]["strategy"] == "expert"
