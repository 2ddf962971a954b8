"""Routers with state (`vmoe_routing.StatefulRouter`): the MoE layer keeps the state in the
`router_state` collection, passes it to the router, and in training replaces it with the
router's update from the batch's metrics (joined over every group, as the layer reports them).
Stateless routers: no collection, nothing changes.

The router here is a test-local one (its state scales each expert's combine weights, and its
update adds the batch's expert loads), so these are checks of the contract, not of a plugin;
the aux-free plugin's own tests and the 8-device run (test_multidevice.py) use a real one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_layers as vl
import vmoe_routing

B, T, D, E, H = 4, 6, 8, 4, 16


@dataclasses.dataclass(frozen=True)
class ScaleRouter(vmoe_routing.TopKRouter):
    """top_k whose state {"scale": [E]} multiplies each expert's combine weights; the update
    adds the batch's expert loads to it."""

    noise_std: float = 0.0
    load_loss_weight: float = 0.0

    def init_state(self, d_model):
        return {"scale": jnp.ones((self.num_experts,), jnp.float32)}

    def __call__(self, params, x_gsd, *, rng=None, deterministic=True, state=None):
        routing = super().__call__(params, x_gsd, rng=rng, deterministic=deterministic)
        return dataclasses.replace(routing, weight=routing.weight * state["scale"][routing.expert])

    def update_state(self, state, metrics):
        return {"scale": state["scale"] + metrics["expert_load"]}


ROUTER = ScaleRouter(num_experts=E, k=2, capacity_factor=2.0)


def _x(seed=0, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def _layer(**kwargs):
    return vl.MoeLayer(E, H, router=ROUTER, **kwargs)


def _init(layer, x):
    return jax.jit(layer.init)(jax.random.key(0), x)


def _apply(layer, variables, x, deterministic=True, mutable=False):
    """`layer.apply` under jit (a program per call: fewer compiles than op by op)."""
    apply = functools.partial(layer.apply, deterministic=deterministic, mutable=mutable)
    return jax.jit(apply)(variables, x)


TRAIN = {"deterministic": False, "mutable": vl.ROUTER_STATE}


def _split_in_two(moe_fn, router_inputs, expert_params, x_gsd, keys_g):
    """An exchange, in one process: the groups in two halves, each routed on its own (under
    vmap, as shard_map would on two devices), statistics joined with `combine_over_shards`."""

    def on_shard(x_gsd):
        y_gsd, stats = moe_fn(router_inputs, expert_params, x_gsd, None, vl.run_local_experts)
        return y_gsd, vmoe_routing.combine_over_shards(stats, "shard")

    halves = x_gsd.reshape(2, -1, *x_gsd.shape[1:])
    y, stats = jax.vmap(on_shard, axis_name="shard")(halves)
    return y.reshape(x_gsd.shape), jax.tree.map(lambda a: a[0], stats)


def test_init_returns_the_routers_initial_state_beside_the_params():
    variables = _init(_layer(), _x())
    assert set(variables) == {"params", vl.ROUTER_STATE}
    np.testing.assert_array_equal(variables[vl.ROUTER_STATE]["router"]["scale"], np.ones(E))


def test_a_stateless_router_has_no_router_state_collection():
    layer = vl.MoeLayer(E, H, router="top_k")
    assert set(jax.eval_shape(layer.init, jax.random.key(0), _x())) == {"params"}
    model = vl.create_model("V-MoE-Nano/4", num_classes=3, router="bpr")
    assert set(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))) == {"params"}


def test_the_router_reads_the_state():
    layer, x = _layer(), _x()
    variables = _init(layer, x)
    doubled = {**variables, vl.ROUTER_STATE: {"router": {"scale": 2 * jnp.ones(E)}}}
    out, twice = _apply(layer, variables, x), _apply(layer, doubled, x)
    # Each token's output is sum_e w_e * expert_e(x): scaling every w by 2 doubles it.
    np.testing.assert_allclose(twice.output, 2 * out.output, rtol=1e-6, atol=1e-6)


def test_training_with_the_collection_mutable_stores_the_update_from_the_reported_metrics():
    layer, x = _layer(), _x()
    variables = _init(layer, x)
    out, updated = _apply(layer, variables, x, **TRAIN)
    expected = ROUTER.update_state(variables[vl.ROUTER_STATE]["router"], out.metrics)
    # Equal up to float rounding: the layer's update is compiled with (fused into) the rest.
    np.testing.assert_allclose(
        updated[vl.ROUTER_STATE]["router"]["scale"], expected["scale"], rtol=1e-6
    )
    # The metrics are the batch's: expert loads over all B groups (not one group's).
    assert float(jnp.sum(out.metrics["expert_load"])) == pytest.approx(1.0)


def test_evaluation_and_immutable_training_leave_the_state_alone():
    layer, x = _layer(), _x()
    variables = _init(layer, x)
    _, same = _apply(layer, variables, x, deterministic=True, mutable=vl.ROUTER_STATE)
    np.testing.assert_array_equal(same[vl.ROUTER_STATE]["router"]["scale"], np.ones(E))
    out = _apply(layer, variables, x, deterministic=False)  # nothing mutable: just the output
    assert isinstance(out, vl.MoeOutput)


def test_the_update_uses_the_statistics_joined_over_the_exchanges_shards():
    x = _x(1)
    variables = _init(_layer(), x)
    whole, whole_state = _apply(_layer(), variables, x, **TRAIN)
    split, split_state = _apply(_layer(exchange=_split_in_two), variables, x, **TRAIN)
    np.testing.assert_allclose(split.output, whole.output, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        split_state[vl.ROUTER_STATE]["router"]["scale"],
        whole_state[vl.ROUTER_STATE]["router"]["scale"],
        rtol=1e-6,
    )
    # Not vacuous: the first half's own loads would give another state.
    half = _apply(_layer(), variables, x[: B // 2])
    assert not np.allclose(half.metrics["expert_load"], whole.metrics["expert_load"])


def test_no_gradient_reaches_the_state():
    layer, x = _layer(), _x()
    variables = _init(layer, x)

    def loss(state, params):
        out, updated = layer.apply(
            {"params": params, vl.ROUTER_STATE: state},
            x,
            deterministic=False,
            mutable=[vl.ROUTER_STATE],
        )
        return jnp.sum(out.output**2) + jnp.sum(updated[vl.ROUTER_STATE]["router"]["scale"])

    state_grads, param_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        variables[vl.ROUTER_STATE], variables["params"]
    )
    np.testing.assert_array_equal(state_grads["router"]["scale"], np.zeros(E))
    assert float(jnp.abs(param_grads["router"]["gate"]).max()) > 0  # the gate still learns


def test_apply_without_the_state_names_the_collection_to_pass():
    layer, x = _layer(), _x()
    params = _init(layer, x)["params"]
    for mutable in (False, [vl.ROUTER_STATE]):
        with pytest.raises(ValueError, match=r"keeps state .* in the 'router_state' collection"):
            layer.apply({"params": params}, x, deterministic=False, mutable=mutable)


def test_a_router_with_only_half_of_the_state_members_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Half(vmoe_routing.TopKRouter):
        def init_state(self, d_model):
            return {}

    layer = vl.MoeLayer(E, H, router=Half(num_experts=E))
    with pytest.raises(ValueError, match="has init_state but not update_state"):
        layer.init(jax.random.key(0), _x())


@pytest.mark.slow
def test_a_vit_keeps_one_state_per_moe_block_and_remat_changes_nothing():
    model = vl.create_model("V-MoE-Nano/4", num_classes=3, router=ROUTER)
    images = _x(2, (2, 8, 8, 1))
    variables = jax.jit(model.init)(jax.random.key(0), images)
    blocks = [n for n, v in variables["params"].items() if isinstance(v, dict) and "moe" in v]
    assert sorted(variables[vl.ROUTER_STATE]) == sorted(blocks) and blocks

    def train(remat):
        apply = functools.partial(
            model.clone(remat=remat).apply, train=True, mutable=vl.ROUTER_STATE
        )
        return jax.jit(apply)(variables, images)

    (out, state), (_, remat_state) = train("none"), train("block")
    for name in blocks:
        expected = ROUTER.update_state(
            variables[vl.ROUTER_STATE][name]["moe"]["router"], out.metrics[f"moe_{name}"]
        )
        np.testing.assert_allclose(
            state[vl.ROUTER_STATE][name]["moe"]["router"]["scale"], expected["scale"], rtol=1e-6
        )
    jax.tree.map(np.testing.assert_array_equal, remat_state, state)


def test_init_router_state_is_replicated_on_the_strategys_mesh():
    strategy = vl.get_strategy("data", mesh_shape=(1,), devices=jax.devices()[:1])
    model = vl.create_model("V-MoE-Nano/4", num_classes=3, router=ROUTER)
    images = np.zeros((1, 8, 8, 1), np.float32)
    state = vl.init_router_state(strategy, model, images)
    reference = jax.jit(model.init)(jax.random.key(0), images)[vl.ROUTER_STATE]
    jax.tree.map(np.testing.assert_array_equal, state, reference)
    replicated = jax.sharding.NamedSharding(strategy.mesh, jax.sharding.PartitionSpec())
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(state))
    stateless = vl.create_model("V-MoE-Nano/4", num_classes=3, router="top_k")
    assert vl.init_router_state(strategy, stateless, images) == {}
