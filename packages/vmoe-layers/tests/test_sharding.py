"""Sharding strategies: specs and meshes, and equality with the single-device run.

The multi-device checks run in subprocesses (XLA_FLAGS must be set before jax starts): one with
8 host devices runs every (strategy, mesh) case; two jax.distributed processes on localhost run
the expert strategy across processes. Both are compared with the single-device loss and
gradients of the same model and batch (`sharding_case`).

Tolerances: the loss within 1e-5 (relative); every gradient leaf within 1e-4 of its largest
entry (floored at 1e-3 of the largest gradient entry of the model, for leaves whose exact
gradient is 0). Only float32 summation order differs between the runs.
"""

from __future__ import annotations

import dataclasses
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
from jax.sharding import AbstractMesh, PartitionSpec

import vmoe_layers as vl

HERE = pathlib.Path(__file__).parent
LOSS_RTOL, GRAD_RTOL, STATS_ATOL = 1e-5, 1e-4, 1e-5


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


@pytest.fixture(scope="module")
def eight_devices():
    """The report of every (strategy, mesh) case run on 8 host devices."""
    flags = "--xla_force_host_platform_device_count=8"
    result = _run_script("multidevice_worker.py", env={"XLA_FLAGS": flags})
    return json.loads(result.stdout.strip().splitlines()[-1])


def _case_id(name, mesh_shape):
    return f"{name}-{mesh_shape}"


@pytest.mark.slow
@pytest.mark.parametrize("name, mesh_shape", case.CASES, ids=[f"{n}-{m}" for n, m in case.CASES])
def test_eight_devices_equal_one_device(eight_devices, name, mesh_shape):
    report = eight_devices["cases"][_case_id(name, mesh_shape)]
    assert report["loss"] == pytest.approx(report["reference_loss"], rel=LOSS_RTOL)
    assert report["grad_max_rel_diff"] < GRAD_RTOL
    # Aux losses and routing metrics (means over groups, joined over devices) equal too.
    assert report["stats_max_diff"] < STATS_ATOL


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, mesh_shape",
    [("expert", (1, 8)), ("expert", (2, 4)), ("expert", (4, 2)), ("expert_fsdp", (2, 4))],
)
def test_expert_strategies_split_experts_and_exchange_by_all_to_all(
    eight_devices, name, mesh_shape
):
    report = eight_devices["cases"][_case_id(name, mesh_shape)]
    assert report["all_to_all"]
    # w_in [E=8, 16, 32]: each device holds E / (size of the expert axis) experts; expert_fsdp
    # also splits their largest other dimension (32) over 'data' (2).
    hidden = 32 // mesh_shape[0] if name == "expert_fsdp" else 32
    assert report["expert_shard_shape"] == [8 // mesh_shape[1], 16, hidden]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case_id", ["data-None", "expert-(2, 4)", "fsdp-(2, 4)", "expert_fsdp-(2, 4)"]
)
def test_init_sharded_creates_the_single_device_params_in_the_strategys_layout(
    eight_devices, case_id
):
    assert eight_devices["init_sharded"][case_id] == {"values_match": True, "layout_ok": True}


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
def test_readme_examples_run_on_eight_devices(eight_devices):
    assert eight_devices["readme"] == "ok", eight_devices["readme"]


@pytest.mark.slow
def test_data_and_fsdp_need_no_all_to_all(eight_devices):
    for name, mesh_shape in case.CASES:
        if not name.startswith("expert"):
            assert not eight_devices["cases"][_case_id(name, mesh_shape)]["all_to_all"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4), (4, 2)])
def test_fsdp_splits_params_over_the_fsdp_axis(eight_devices, mesh_shape):
    report = eight_devices["cases"][_case_id("fsdp", mesh_shape)]
    assert report["expert_shard_shape"] == [8, 16, 32 // mesh_shape[1]]  # largest dim: 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("VMOE_SHARDING_MATRIX") != "1",
    reason="an extra multi-process case: `nox -s sharding-matrix` (the default run keeps the "
    "trainer's two-process test, vmoe-train test_resume_and_processes.py)",
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
                assert float(result[f"{name}/loss"]) == pytest.approx(loss, rel=LOSS_RTOL)
                got = {key: result[f"{name}/grad{key}"] for key in grads_expected}
                assert case.max_relative_difference(got, grads_expected) < GRAD_RTOL


# Specs and meshes, on abstract meshes: no devices needed.


def _params_like_a_vmoe():
    return {
        "block_0": {"mlp": {"w_in": np.zeros((16, 32)), "b_in": np.zeros(32)}},
        "block_1": {
            "moe": {
                "experts": {"w_in": np.zeros((8, 16, 32)), "b_in": np.zeros((8, 32))},
                "router": {"gate": np.zeros((16, 8))},
            }
        },
    }


def test_data_strategy_replicates_params_and_splits_the_batch():
    strategy = vl.DataParallel(AbstractMesh((8,), ("data",)))
    specs = strategy.param_specs(_params_like_a_vmoe())
    assert set(jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))) == {
        PartitionSpec()
    }
    assert strategy.batch_spec() == PartitionSpec(("data",))
    assert strategy.exchange is None


def test_expert_strategy_splits_only_expert_params_on_their_expert_axis():
    strategy = vl.ExpertParallel(AbstractMesh((2, 4), ("data", "expert")))
    specs = strategy.param_specs(_params_like_a_vmoe())
    assert specs["block_1"]["moe"]["experts"] == {
        "w_in": PartitionSpec("expert"),
        "b_in": PartitionSpec("expert"),
    }
    assert specs["block_1"]["moe"]["router"]["gate"] == PartitionSpec()
    assert specs["block_0"]["mlp"]["w_in"] == PartitionSpec()
    assert strategy.batch_spec() == PartitionSpec(("data", "expert"))
    assert isinstance(strategy.exchange, vl.AllToAllExchange)


def test_expert_strategy_rejects_experts_not_divisible_by_the_expert_axis():
    strategy = vl.ExpertParallel(AbstractMesh((1, 3), ("data", "expert")))
    message = r"num_experts=8 of block_1/moe/experts/\w+ is not divisible by the 'expert'"
    with pytest.raises(ValueError, match=message):
        strategy.param_specs(_params_like_a_vmoe())


def test_all_to_all_exchange_rejects_experts_not_divisible_by_the_expert_axis():
    exchange = vl.AllToAllExchange(AbstractMesh((1, 3), ("data", "expert")))
    x_gsd, experts = np.zeros((3, 5, 4), np.float32), {"w": np.zeros((8, 4, 4))}
    with pytest.raises(ValueError, match=r"num_experts=8 is not divisible by the 'expert' mesh"):
        exchange(None, {}, experts, x_gsd, None)


def test_a_model_with_an_exchange_initialises_from_one_image():
    # 1 image = 1 routing group, fewer than the 4 batch devices: init runs the experts locally.
    exchange = vl.AllToAllExchange(AbstractMesh((2, 2), ("data", "expert")))
    images, _ = case.batch()
    with_exchange = jax.jit(case.model(exchange, group_size=None).init)(
        jax.random.key(0), images[:1]
    )
    without = jax.jit(case.model(None, group_size=None).init)(jax.random.key(0), images[:1])
    # Two programs (with and without the exchange): equal up to float32 rounding.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **case.PARAMS_TOL), with_exchange, without
    )


def test_all_to_all_exchange_rejects_groups_not_divisible_by_the_batch_devices():
    exchange = vl.AllToAllExchange(AbstractMesh((2, 2), ("data", "expert")))
    x_gsd, experts = np.zeros((6, 5, 4), np.float32), {"w": np.zeros((8, 4, 4))}
    with pytest.raises(ValueError, match=r"makes 6 routing groups, not divisible by the 4 devices"):
        exchange(None, {}, experts, x_gsd, None)


def test_fsdp_splits_the_largest_divisible_dimension_of_big_params():
    strategy = vl.FullySharded(AbstractMesh((2, 4), ("data", "fsdp")), min_size=100)
    specs = strategy.param_specs(_params_like_a_vmoe())
    assert specs["block_1"]["moe"]["experts"]["w_in"] == PartitionSpec(None, None, "fsdp")
    assert specs["block_1"]["moe"]["experts"]["b_in"] == PartitionSpec(None, "fsdp")
    assert specs["block_1"]["moe"]["router"]["gate"] == PartitionSpec("fsdp", None)
    assert specs["block_0"]["mlp"]["b_in"] == PartitionSpec()  # 32 < min_size: replicated
    assert strategy.batch_spec() == PartitionSpec(("data", "fsdp"))


def test_expert_fsdp_splits_experts_over_expert_and_the_rest_over_every_device():
    strategy = vl.ExpertFullySharded(AbstractMesh((2, 4), ("data", "expert")), min_size=100)
    specs = strategy.param_specs(_params_like_a_vmoe())
    experts = specs["block_1"]["moe"]["experts"]
    # Experts over 'expert' (leading axis) and their largest other dimension over 'data'.
    assert experts["w_in"] == PartitionSpec("expert", None, "data")
    assert experts["b_in"] == PartitionSpec("expert", "data")
    # Everything else: the largest dimension divisible by all 8 devices, over both axes.
    assert specs["block_1"]["moe"]["router"]["gate"] == PartitionSpec(("data", "expert"), None)
    assert specs["block_0"]["mlp"]["w_in"] == PartitionSpec(None, ("data", "expert"))
    assert specs["block_0"]["mlp"]["b_in"] == PartitionSpec()  # 32 < min_size: replicated
    assert strategy.batch_spec() == PartitionSpec(("data", "expert"))
    assert isinstance(strategy.exchange, vl.AllToAllExchange)


def test_expert_fsdp_falls_back_to_the_data_axis_for_dims_not_divisible_by_every_device():
    strategy = vl.ExpertFullySharded(AbstractMesh((2, 4), ("data", "expert")), min_size=1)
    specs = strategy.param_specs({"w": np.zeros((6, 10))})
    assert specs["w"] == PartitionSpec(None, "data")  # 10 splits over data=2, not over 8


def test_expert_fsdp_rejects_experts_not_divisible_by_the_expert_axis():
    strategy = vl.ExpertFullySharded(AbstractMesh((1, 3), ("data", "expert")))
    with pytest.raises(ValueError, match=r"num_experts=8 of block_1/moe/experts/\w+ is not"):
        strategy.param_specs(_params_like_a_vmoe())


def test_strategies_are_listed_and_unknown_ones_rejected():
    assert vl.available_strategies() == ["data", "expert", "expert_fsdp", "fsdp"]
    with pytest.raises(ValueError, match=r"unknown sharding strategy 'experts' \(did you mean"):
        vl.get_strategy("experts")


def test_on_one_device_every_strategy_builds_a_one_device_mesh():
    for name in vl.available_strategies():
        strategy = vl.get_strategy(name)
        assert strategy.mesh.size == jax.device_count() == 1


@pytest.mark.parametrize(
    "name, shape",
    [("data", (8,)), ("expert", (2, 4)), ("fsdp", (2, 4)), ("expert_fsdp", (2, 4))],
)
def test_a_mesh_shape_must_use_every_device(name, shape):
    needs = rf"mesh_shape={re.escape(str(shape))} .* needs 8 devices; there are 1"
    with pytest.raises(ValueError, match=needs):
        vl.get_strategy(name, mesh_shape=shape)


@pytest.mark.parametrize("name", vl.available_strategies())
def test_every_builtin_strategy_takes_a_mesh_shape(name):
    shape = (1,) if name == "data" else (1, 1)
    assert vl.get_strategy(name, mesh_shape=shape).mesh.devices.shape == shape
    with pytest.raises(
        ValueError, match=rf"mesh_shape=\(1, 1, 1\) must be .* for strategy '{name}'"
    ):
        vl.get_strategy(name, mesh_shape=(1, 1, 1))


def test_a_one_device_expert_strategy_runs_the_model():
    strategy = vl.get_strategy("expert")
    model = case.model(strategy.exchange)
    params = vl.shard_params(strategy, case.init_params())
    images, labels = vl.shard_batch(strategy, case.batch())
    loss = jax.jit(case.loss_fn(model))(params, images, labels)
    reference, _ = case.single_device_run()
    assert float(loss) == pytest.approx(reference, rel=LOSS_RTOL)


@dataclasses.dataclass(frozen=True)
class Replicated:
    """A plugin-style strategy: only the protocol (mesh, param_specs, batch_spec, exchange)."""

    mesh: jax.sharding.Mesh
    exchange = None

    def param_specs(self, params):
        return jax.tree.map(lambda _: PartitionSpec(), params)

    def batch_spec(self):
        return PartitionSpec()


def test_the_free_functions_work_with_a_plugin_strategy():
    strategy = Replicated(vl.make_mesh((1,), ("data",)))
    assert isinstance(strategy, vl.ShardingStrategy)
    images, labels = vl.shard_batch(strategy, case.batch())
    params = vl.init_sharded(strategy, case.model(), jax.random.key(0), images[:2])
    reference = jax.jit(case.model().init)(jax.random.key(0), images)["params"]
    # init_sharded (2 images) vs model.init (16): two programs, equal up to float32 rounding.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **case.PARAMS_TOL), params, reference
    )
    assert vl.shard_params(strategy, params)["head"]["bias"].sharding.spec == PartitionSpec()
    loss = jax.jit(case.loss_fn(case.model()))(params, images, labels)
    assert np.isfinite(float(loss))


def test_init_sharded_accepts_a_raw_uint32_key():
    strategy = vl.get_strategy("data")
    images, _ = case.batch()
    raw = vl.init_sharded(strategy, case.model(), jax.random.PRNGKey(0), images[:2])
    typed = vl.init_sharded(strategy, case.model(), jax.random.key(0), images[:2])
    jax.tree.map(np.testing.assert_array_equal, raw, typed)


# What crosses devices: read from the compiled program.

# The sharding case's routing arrays: S = 34 tokens per group (2 images), K = 2, E = 8.
GROUP_SIZE, K = 34, 2


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [_case_id(n, m) for n, m in case.CASES if n[:6] == "expert"])
def test_expert_strategies_gather_no_routing_arrays(eight_devices, case_id):
    """Each device routes its own groups: nothing with a per-group token axis (gates
    [G, S, E], tokens [G, S, D], assignments [G, S*K]) is all-gathered in a training step; what
    may be gathered are parameters (e.g. the expert gradients, gathered for the comparison)."""
    gathered = eight_devices["cases"][case_id]["all_gathers"]
    for dims in (dims for shapes in gathered for dims in shapes):
        assert GROUP_SIZE not in dims and GROUP_SIZE * K not in dims, gathered
