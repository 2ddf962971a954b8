"""How the layer and the models take routers: names or objects, defaults merged under the user's
options, the no-expert metric for every router, and gating before the compute-dtype cast."""

from __future__ import annotations

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_layers as vl
import vmoe_plugins
import vmoe_routing

B, T, D, E, H = 2, 8, 6, 4, 12


def _x(seed=0, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def _apply(layer, params, x, **kwargs):
    return layer.apply({"params": params}, x, **kwargs)


def test_a_router_object_is_accepted_and_equals_the_named_router():
    # Was "unknown router BprRouter(...)": only names were accepted.
    by_object = vl.MoeLayer(E, H, router=vmoe_routing.BprRouter(num_experts=E, k=2))
    by_name = vl.MoeLayer(E, H, router="bpr", router_options={"k": 2, "capacity_factor": 1.0})
    x = _x()
    params = by_object.init(jax.random.key(1), x)["params"]
    assert by_object.make_router() == by_name.make_router()
    np.testing.assert_array_equal(
        _apply(by_object, params, x).output, _apply(by_name, params, x).output
    )


def test_router_options_with_an_object_are_applied_with_replace():
    layer = vl.MoeLayer(
        E, H, router=vmoe_routing.TopKRouter(num_experts=E), router_options={"k": 3}
    )
    assert layer.make_router() == vmoe_routing.TopKRouter(num_experts=E, k=3)


def test_a_router_object_in_moe_config_and_create_model():
    router = vmoe_routing.BprRouter(num_experts=4, k=1, capacity_factor=0.5)
    model = vl.create_model("V-MoE-Nano/4", num_classes=3, router=router)
    named = vl.create_model(
        "V-MoE-Nano/4",
        num_classes=3,
        router="bpr",
        router_options={"k": 1, "capacity_factor": 0.5},
    )
    assert model.moe.router is router
    images = _x(shape=(2, 8, 8, 1))
    variables = jax.jit(model.init)(jax.random.key(0), images)
    np.testing.assert_array_equal(
        jax.jit(model.apply)(variables, images).logits,
        jax.jit(named.apply)(variables, images).logits,
    )
    hash(model.moe)  # still hashable (flax modules holding it are static jit arguments)


def test_an_object_that_is_not_a_router_is_refused_naming_what_it_lacks():
    @dataclasses.dataclass(frozen=True)
    class NotARouter:
        num_experts: int = E

        def init(self, rng, d_model):
            return {}

    layer = vl.MoeLayer(E, H, router=NotARouter())
    with pytest.raises(ValueError, match=r"a NotARouter without \['__call__', 'replace'\]"):
        layer.init(jax.random.key(0), _x())


def test_a_router_object_with_another_num_experts_is_refused():
    layer = vl.MoeLayer(E, H, router=vmoe_routing.TopKRouter(num_experts=8))
    with pytest.raises(ValueError, match=r"num_experts=8 but the layer has num_experts=4"):
        layer.init(jax.random.key(0), _x())


def test_user_router_options_are_merged_over_the_model_defaults():
    # Was: options replaced the defaults, so {"noise_std": 0.5} silently meant k=1, C=1.0.
    model = vl.create_model("V-MoE-Nano/4", num_classes=3, router_options={"noise_std": 0.5})
    layer = vl.MoeLayer(
        model.moe.num_experts, model.mlp_dim, router_options=model.moe.router_options
    )
    expected = vmoe_routing.TopKRouter(num_experts=4, k=2, capacity_factor=1.05, noise_std=0.5)
    assert layer.make_router() == expected

    # End to end: the model routes as the one with the defaults written out, not as k=1, C=1.
    explicit = {"k": 2, "capacity_factor": 1.05, "noise_std": 0.5}
    router_defaults = {"k": 1, "capacity_factor": 1.0, "noise_std": 0.5}
    images = _x(shape=(4, 8, 8, 1))
    variables = jax.jit(model.init)(jax.random.key(0), images)
    variables = jax.tree.map(lambda p: p * 3.0, variables)  # decisive gates, non-zero head
    variables["params"]["head"]["kernel"] = _x(5, (32, 3))

    def logits(options):
        m = vl.create_model("V-MoE-Nano/4", num_classes=3, router_options=options)
        return np.asarray(jax.jit(m.apply)(variables, images).logits)

    np.testing.assert_array_equal(logits({"noise_std": 0.5}), logits(explicit))
    assert not np.allclose(logits({"noise_std": 0.5}), logits(router_defaults))


def test_the_defaults_live_in_one_place():
    assert vl.DEFAULT_ROUTER_OPTIONS == {"k": 2, "capacity_factor": 1.05}
    assert vl.MoeConfig(num_experts=4).router_options == {}
    assert vl.MoeLayer(E, H).make_router() == vmoe_routing.TopKRouter(
        num_experts=E, **vl.DEFAULT_ROUTER_OPTIONS
    )
    assert vl.MoeLayer(E, H, router="hash").make_router().k == 2  # the plugin takes k too


@dataclasses.dataclass(frozen=True)
class FirstExpertRouter:
    """Every token to expert 0 (no k, no metrics): defaults it lacks must not be passed."""

    num_experts: int
    capacity_factor: float = 1.0

    def init(self, rng, d_model):
        return {}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def __call__(self, params, x_gsd, *, rng=None, deterministic=True):
        g, s, _ = x_gsd.shape
        capacity = vmoe_routing.compute_capacity(s, self.num_experts, 1, self.capacity_factor)
        return vmoe_routing.Routing(  # only the assignments: aux losses and metrics default
            token=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s)),
            expert=jnp.zeros((g, s), jnp.int32),
            slot=jnp.broadcast_to(jnp.minimum(jnp.arange(s), capacity), (g, s)).astype(jnp.int32),
            weight=jnp.broadcast_to((jnp.arange(s) < capacity).astype(jnp.float32), (g, s)),
            valid=jnp.broadcast_to(jnp.arange(s) < capacity, (g, s)),
            group_size=s,
            num_experts=self.num_experts,
            capacity=capacity,
        )


class FirstExpertPlugin:
    @vmoe_plugins.hookimpl
    def vmoe_routers(self):
        return {"first_expert": FirstExpertRouter}


@pytest.fixture
def first_expert_router():
    name = vmoe_plugins.register_plugin(FirstExpertPlugin(), name="first-expert-plugin")
    yield
    vmoe_plugins.unregister_plugin(name)


def test_a_router_without_k_gets_only_the_defaults_it_takes(first_expert_router):
    layer = vl.MoeLayer(E, H, router="first_expert")
    assert layer.make_router() == FirstExpertRouter(num_experts=E, capacity_factor=1.05)


def test_every_layer_reports_tokens_with_no_expert_even_if_the_router_does_not(
    first_expert_router,
):
    # S=8, E=4, C=1.05: capacity ceil(1.05 * 8 / 4) = 3; all tokens want expert 0, 3 get it.
    layer = vl.MoeLayer(E, H, router="first_expert")
    x = _x()
    out = _apply(layer, layer.init(jax.random.key(0), x)["params"], x)
    assert float(out.metrics["no_expert_fraction"]) == pytest.approx(5 / 8)
    assert float(out.aux_loss) == 0.0 and out.aux_losses == {}


def _no_expert_reference(routing) -> float:
    """Loop over groups and assignments: tokens with no valid assignment, as a fraction."""
    token, valid = np.asarray(routing.token), np.asarray(routing.valid)
    missing = 0
    for g in range(token.shape[0]):
        kept = {int(t) for t, v in zip(token[g], valid[g], strict=True) if v}
        missing += routing.group_size - len(kept)
    return missing / (token.shape[0] * routing.group_size)


@pytest.mark.parametrize("router", ["top_k", "bpr"])
@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0])
def test_no_expert_fraction_of_layer_and_model_equals_a_loop(router, capacity_factor):
    layer = vl.MoeLayer(E, H, router=router, router_options={"capacity_factor": capacity_factor})
    x = _x(3, (4, 16, D))
    params = layer.init(jax.random.key(0), x)["params"]
    out = _apply(layer, params, x)
    routing = layer.make_router()(params["router"], x.reshape(4, 16, D))
    assert float(out.metrics["no_expert_fraction"]) == pytest.approx(_no_expert_reference(routing))
    if capacity_factor == 0.25:  # capacity 2 of 16 tokens x 2 choices: most tokens get none
        assert float(out.metrics["no_expert_fraction"]) > 0.3


def test_the_model_metrics_have_no_expert_fraction_per_moe_block():
    model = vl.create_model("V-MoE-Nano/4", num_classes=3, router_options={"capacity_factor": 0.3})
    images = _x(shape=(2, 8, 8, 1))
    out = jax.jit(model.apply)(jax.jit(model.init)(jax.random.key(0), images), images)
    assert set(out.metrics) == {"moe_block_1"}
    assert 0.0 < float(out.metrics["moe_block_1"]["no_expert_fraction"]) < 1.0


def _gate_dot_inputs(jaxpr, d_model, num_experts):
    """dtypes of the inputs of the gate matmul ([..., D] x [D, E]) and of what fed them."""
    found = []
    producers = {}
    for eqn in jaxpr.eqns:
        for out in eqn.outvars:
            producers[out] = eqn
        if eqn.primitive.name == "dot_general":
            lhs, rhs = eqn.invars
            if rhs.aval.shape == (d_model, num_experts):
                chain, var = [lhs.aval.dtype], lhs
                while var in producers and producers[var].primitive.name in (
                    "convert_element_type",
                    "reshape",
                ):
                    var = producers[var].invars[0]
                    chain.append(var.aval.dtype)
                found.append((chain, rhs.aval.dtype))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _gate_dot_inputs(sub, d_model, num_experts)
    return found


def test_gate_dtype_float32_gates_in_float32_under_bfloat16_compute():
    # Was: the layer cast x to bfloat16 before routing, so gate_dtype=float32 gated rounded tokens.
    layer = vl.MoeLayer(
        E, H, router="top_k", router_options={"gate_dtype": jnp.float32}, dtype=jnp.bfloat16
    )
    x = _x()  # float32
    params = layer.init(jax.random.key(0), x)["params"]
    jaxpr = jax.make_jaxpr(lambda p, x: _apply(layer, p, x))(params, x).jaxpr
    gates = _gate_dot_inputs(jaxpr, D, E)
    assert gates, "no gate matmul found"
    for chain, rhs_dtype in gates:
        assert rhs_dtype == jnp.float32
        assert all(dtype == jnp.float32 for dtype in chain), chain  # never through bfloat16
    # And the experts still compute in bfloat16.
    assert _apply(layer, params, x).output.dtype == jnp.bfloat16
