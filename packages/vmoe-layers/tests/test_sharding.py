"""Sharding strategies: their specs on abstract meshes, and what runs on one device.

The multi-device runs are in test_multidevice.py.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
import sharding_case as case
from jax.sharding import AbstractMesh, PartitionSpec

import vmoe_layers as vl

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
    assert strategy.exchange == vl.PerShardExchange(strategy.mesh, ("data",))


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
    reference = case.jitted_loss()(case.init_params(), *case.batch())
    assert float(loss) == pytest.approx(float(reference), rel=case.LOSS_RTOL)


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
    reference = case.initial_params()
    # init_sharded (2 images) vs model.init (16): two programs, equal up to float32 rounding.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **case.PARAMS_TOL), params, reference
    )
    assert vl.shard_params(strategy, params)["head"]["bias"].sharding.spec == PartitionSpec()
    loss = case.jitted_loss()(params, images, labels)
    assert np.isfinite(float(loss))


def test_init_sharded_accepts_a_raw_uint32_key():
    strategy = vl.get_strategy("data")
    images, _ = case.batch()
    raw = vl.init_sharded(strategy, case.model(), jax.random.PRNGKey(0), images[:2])
    typed = vl.init_sharded(strategy, case.model(), jax.random.key(0), images[:2])
    jax.tree.map(np.testing.assert_array_equal, raw, typed)
