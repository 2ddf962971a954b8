"""Expert types: the built-ins' maths and params, the registry, and plugin expert types."""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import layers_reference as reference
import numpy as np
import pytest

import vmoe_layers as vl
import vmoe_plugins as plugins
import vmoe_routing

E, T, D, H = 3, 5, 4, 7


def _stack(expert_type, seed=0):
    specs = expert_type.param_specs(D)
    keys = jax.random.split(jax.random.key(seed), len(specs))
    return {
        name: jax.random.normal(key, (E, *spec.shape))
        for key, (name, spec) in zip(keys, sorted(specs.items()), strict=True)
    }


@pytest.mark.parametrize(
    "name, one_expert", [("mlp", reference.mlp_expert), ("glu", reference.glu_expert)]
)
def test_batched_experts_equal_each_expert_on_each_token(name, one_expert):
    expert_type = vl.get_expert_type(name, mlp_dim=H)
    params = _stack(expert_type)
    x_etd = jax.random.normal(jax.random.key(1), (E, T, D))
    y_etd = expert_type(params, x_etd, dtype=jnp.float32)
    expected = [[one_expert(params, e, x_etd[e, t]) for t in range(T)] for e in range(E)]
    np.testing.assert_allclose(y_etd, np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_mlp_declares_the_vit_mlp_params_per_expert():
    specs = vl.get_expert_type("mlp", mlp_dim=H).param_specs(D)
    assert {n: s.shape for n, s in specs.items()} == {
        "w_in": (D, H),
        "b_in": (H,),
        "w_out": (H, D),
        "b_out": (D,),
    }


def test_glu_declares_gate_up_and_out_without_biases():
    specs = vl.get_expert_type("glu", mlp_dim=H).param_specs(D)
    assert {n: s.shape for n, s in specs.items()} == {
        "w_gate": (D, H),
        "w_up": (D, H),
        "w_out": (H, D),
    }


def test_activation_option_changes_the_function():
    params = _stack(vl.MlpExperts(H))
    x_etd = jax.random.normal(jax.random.key(1), (E, T, D))
    relu = vl.get_expert_type("mlp", mlp_dim=H, activation="relu")(params, x_etd, dtype=jnp.float32)
    h = jax.nn.relu(jnp.einsum("etd,edh->eth", x_etd, params["w_in"]) + params["b_in"][:, None])
    expected = jnp.einsum("eth,ehd->etd", h, params["w_out"]) + params["b_out"][:, None]
    np.testing.assert_allclose(relu, expected, rtol=1e-5, atol=1e-6)


def test_builtins_are_listed():
    # Plugin packages (vmoe-experts-extra) may add more where they are installed.
    names = vl.available_expert_types()
    builtins = [n for n in names if vl.EXPERT_TYPES.provider(n).endswith("(built-in)")]
    assert builtins == ["glu", "mlp"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mlp_dim": 0}, r"mlp_dim=0 must be an integer >= 1"),
        ({"mlp_dim": 8, "activation": "tanh"}, r"activation='tanh' is not one of \['gelu'"),
        ({"mlp_dim": 8, "bias": False}, r"unknown option\(s\) \['bias'\] for expert type 'mlp'"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        vl.get_expert_type("mlp", **options)


def test_unknown_expert_type_suggests_and_lists():
    with pytest.raises(ValueError, match=r"unknown expert type 'gluu' \(did you mean 'glu'\?\)"):
        vl.get_expert_type("gluu", mlp_dim=4)


@dataclasses.dataclass(frozen=True)
class ScaledIdentity:
    """A plugin expert type: y = x * scale_e (one learned scalar per expert)."""

    mlp_dim: int

    def param_specs(self, d_model):
        return {"scale": vl.ParamSpec((), jax.nn.initializers.ones)}

    def __call__(self, params, x_etd, *, dtype):
        return x_etd.astype(dtype) * params["scale"][:, None, None].astype(dtype)


@pytest.fixture
def scaled_identity_plugin():
    @vmoe_routing.hookimpl
    def vmoe_expert_types():
        return {"scaled_identity": ScaledIdentity}

    name = vmoe_routing.register_plugin(types.SimpleNamespace(vmoe_expert_types=vmoe_expert_types))
    yield
    plugins.unregister_plugin(name)


def test_a_plugin_expert_type_is_stacked_and_used_by_the_layer(scaled_identity_plugin):
    assert "scaled_identity" in vl.available_expert_types()
    layer = vl.MoeLayer(
        num_experts=2,
        mlp_dim=1,
        expert_type="scaled_identity",
        router="hash",
        router_options={"k": 1, "capacity_factor": 2.0},
    )
    x = jax.random.normal(jax.random.key(0), (1, 8, D))
    params = layer.init(jax.random.key(1), x)["params"]
    assert params["experts"]["scale"].shape == (2,)
    params["experts"]["scale"] = jnp.array([2.0, 3.0])
    y = layer.apply({"params": params}, x).output
    expert = layer.make_router().experts_for_positions(8)[:, 0]
    np.testing.assert_allclose(y[0], x[0] * jnp.array([2.0, 3.0])[expert][:, None], rtol=1e-6)
