"""Sharding strategies on several devices equal the single-device run.

The multi-device checks run in subprocesses (XLA_FLAGS must be set before jax starts): one with
8 host devices runs each strategy on one mesh (every mesh: `nox -s sharding-matrix`); two
jax.distributed processes on localhost run the expert strategies across processes. Both are
compared with the single-device loss and gradients of the same model and batch
(`sharding_case`). A file of its own: under pytest-xdist the whole file goes to one worker, so
the 8-device subprocess (the package's longest step, a module fixture) runs once.

Tolerances: `sharding_case.LOSS_RTOL` and its neighbours (only float32 summation order differs).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import sharding_case as case

HERE = pathlib.Path(__file__).parent


def _run_script(script: str, *args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(HERE / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr[-5000:]}"
    return result


def _eight_device_report(*args: str) -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    result = _run_script("multidevice_worker.py", *args, env={"XLA_FLAGS": flags})
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def eight_devices():
    """The report of every (strategy, mesh) case run on 8 host devices."""
    return _eight_device_report()


@pytest.fixture(scope="module")
def eight_devices_extended():
    """The extended cases' report (init_sharded under expert and fsdp, the README)."""
    return _eight_device_report("--extended")


def _case_id(name, mesh_shape):
    return f"{name}-{mesh_shape}"


@pytest.mark.slow
@pytest.mark.parametrize("name, mesh_shape", case.CASES, ids=[f"{n}-{m}" for n, m in case.CASES])
def test_eight_devices_equal_one_device(eight_devices, name, mesh_shape):
    report = eight_devices["cases"][_case_id(name, mesh_shape)]
    assert report["loss"] == pytest.approx(report["reference_loss"], rel=case.LOSS_RTOL)
    assert report["grad_max_rel_diff"] < case.GRAD_RTOL
    # Aux losses and routing metrics (means over groups, joined over devices) equal too.
    assert report["stats_max_diff"] < case.STATS_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name, mesh_shape", case.CASES, ids=[f"{n}-{m}" for n, m in case.CASES])
def test_router_state_after_several_steps_equals_one_device(eight_devices, name, mesh_shape):
    """The aux-free router (its balancing bias is router state, updated after every training
    step from the batch's expert loads): STATE_STEPS steps in a row, each fed the state the
    previous returned. Every device updates it from the load joined over all of them, so the
    state, and the last step's loss, gradients and statistics, equal one device's."""
    report = eight_devices["router_state"][_case_id(name, mesh_shape)]
    assert report["router_state_moved"], report  # the bias did move: the check is not vacuous
    assert report["router_state_max_diff"] < case.STATE_ATOL
    assert report["loss"] == pytest.approx(report["reference_loss"], rel=case.LOSS_RTOL)
    assert report["grad_max_rel_diff"] < case.GRAD_RTOL
    assert report["stats_max_diff"] < case.STATS_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name, mesh_shape", case.CASES, ids=[f"{n}-{m}" for n, m in case.CASES])
def test_each_strategy_splits_the_experts_as_it_says(eight_devices, name, mesh_shape):
    report = eight_devices["cases"][_case_id(name, mesh_shape)]
    # expert strategies exchange tokens by all-to-all; data and fsdp never do.
    assert report["all_to_all"] == name.startswith("expert")
    assert report["expert_shard_shape"] == case.expected_expert_shard_shape(name, mesh_shape)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, mesh_shape",
    [
        (name, mesh_shape)
        if name in case.INIT_SHARDED_CASES
        else pytest.param(name, mesh_shape, marks=pytest.mark.extended)
        for name, mesh_shape in case.CASES
    ],
    ids=[f"{n}-{m}" for n, m in case.CASES],
)
def test_init_sharded_creates_the_single_device_params_in_the_strategys_layout(
    request, name, mesh_shape
):
    fixture = "eight_devices" if name in case.INIT_SHARDED_CASES else "eight_devices_extended"
    report = request.getfixturevalue(fixture)["init_sharded"][_case_id(name, mesh_shape)]
    assert report == {"values_match": True, "layout_ok": True}


@pytest.mark.slow
def test_shard_batch_rejects_a_batch_not_divisible_by_the_batch_devices(eight_devices):
    message = eight_devices["shard_batch_error"]
    assert message is not None
    assert re.fullmatch(
        r"batch of 6 is not divisible by the 8 devices of the batch axes \('data', 'expert'\); "
        r"allowed: a multiple of 8",
        message,
    ), message


@pytest.mark.slow
@pytest.mark.extended
def test_readme_examples_run_on_eight_devices(eight_devices_extended):
    assert eight_devices_extended["readme"] == "ok", eight_devices_extended["readme"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("VMOE_SHARDING_MATRIX") != "1",
    reason="an extra multi-process case: `nox -s sharding-matrix` (the default run keeps the "
    "trainer's two-process test, vmoe-train test_processes.py)",
)
def test_two_processes_with_the_expert_strategies_equal_one_process(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    outputs = [tmp_path / f"process_{i}.npz" for i in range(2)]
    script = str(HERE / "two_process_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, address, str(i), str(outputs[i])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-5000:]
    loss, grads = case.single_device_run()
    grads_expected = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
    }
    # w_in [8, 16, 32] over (1, 4): 2 experts per device (data axis 1: nothing else split).
    shard_shapes = {"expert_fsdp": [2, 16, 32]}
    for output in outputs:
        with np.load(output) as result:
            for name, shard_shape in shard_shapes.items():
                assert bool(result[f"{name}/all_to_all"])
                assert result[f"{name}/expert_shard_shape"].tolist() == shard_shape
                assert bool(result[f"{name}/init_sharded_ok"])
                assert float(result[f"{name}/loss"]) == pytest.approx(loss, rel=case.LOSS_RTOL)
                got = {key: result[f"{name}/grad{key}"] for key in grads_expected}
                assert case.max_relative_difference(got, grads_expected) < case.GRAD_RTOL


# What crosses devices: read from the compiled program.


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [_case_id(n, m) for n, m in case.CASES])
def test_only_parameters_and_statistics_cross_devices_besides_the_expert_all_to_all(
    eight_devices, case_id
):
    """Each device routes its own groups under every strategy: in a compiled training step,
    every collective carries parameters (gathers, gradient reductions) or routing statistics
    (at most E elements: aux losses, expert loads); only the expert strategies' all-to-all
    carries expert buffers. Nothing of the routing (gates [G, S, E], assignments, buffers
    [G, E, C, D], a dropless sort) is gathered or reduced: with the XLA partitioner routing
    data/fsdp (no exchange), the gates [8, 34, 8] were all-gathered and [8, 34] / [8, 8] arrays
    all-reduced, which `vmoe_layers.comm` calls "MoE layer arrays". (This small model moves no
    other activations either.)"""
    report = eight_devices["cases"][case_id]
    sent = report["bytes_by_role"]
    assert sent["MoE layer arrays"] == 0 and sent["other arrays"] == 0, report
    assert report["unexpected_arrays"] == []
    assert (sent["expert all-to-all"] > 0) == case_id.startswith("expert"), sent
    assert sent["gradient reduction"] > 0 and sent["statistics"] > 0, sent


@pytest.mark.slow
def test_groups_straddling_devices_are_routed_as_one_program_under_data(eight_devices):
    """2 groups of 8 images on 8 devices (e.g. an evaluation batch): `PerShardExchange` cannot
    give each device whole groups, so it routes them as one program: one device's loss."""
    result = eight_devices["straddling_groups"]
    assert result["loss"] == pytest.approx(result["reference"], rel=case.LOSS_RTOL)
