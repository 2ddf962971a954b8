"""Extra expert types: registered by entry point, each equal to its plain definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_layers as vl
from vmoe_experts_extra import IdentityExperts, LowRankExperts, MixedWidthExperts

E, T, D, H = 4, 6, 5, 8


def _stacked(experts, seed=0):
    specs = sorted(experts.param_specs(D).items())
    key = jax.random.key(seed)
    return {
        name: vl.experts.init_stacked(spec, jax.random.fold_in(key, i), E, jnp.float32)
        for i, (name, spec) in enumerate(specs)
    }


def _x(seed=1):
    return jax.random.normal(jax.random.key(seed), (E, T, D))


def test_registered_through_the_entry_point():
    assert {"identity", "low_rank", "mixed_width"} <= set(vl.available_expert_types())
    provider = vl.EXPERT_TYPES.provider("low_rank")
    assert provider.startswith('experts_extra (entry point "experts_extra = vmoe_experts_extra')
    assert isinstance(vl.get_expert_type("identity", mlp_dim=8), IdentityExperts)


def test_identity_returns_its_input_and_has_no_params():
    experts = IdentityExperts(mlp_dim=H)
    assert experts.param_specs(D) == {}
    x = _x()
    np.testing.assert_array_equal(experts({}, x, dtype=jnp.float32), x)


def test_identity_experts_in_a_moe_layer_give_the_gate_weighted_input():
    layer = vl.MoeLayer(num_experts=4, mlp_dim=H, expert_type="identity", group_size=6)
    x = jax.random.normal(jax.random.key(0), (2, 6, D))
    variables = layer.init(jax.random.key(1), x)
    assert variables["params"]["experts"] == {}
    out = layer.apply(variables, x).output
    router = layer.make_router()
    routing = router(variables["params"]["router"], x)
    import vmoe_routing as vr

    np.testing.assert_allclose(out, vr.combine(vr.dispatch(x, routing), routing), atol=1e-6)


def test_low_rank_is_the_mlp_of_the_product_matrices():
    experts = LowRankExperts(mlp_dim=H, rank=2)
    p = _stacked(experts)
    x = _x()
    dense = {
        "w_in": jnp.einsum("edr,erh->edh", p["u_in"], p["v_in"]),
        "b_in": p["b_in"],
        "w_out": jnp.einsum("ehr,erd->ehd", p["u_out"], p["v_out"]),
        "b_out": p["b_out"],
    }
    want = vl.MlpExperts(mlp_dim=H)(dense, x, dtype=jnp.float32)
    np.testing.assert_allclose(experts(p, x, dtype=jnp.float32), want, atol=1e-5)
    sizes = {k: v.shape[1:] for k, v in p.items()}
    assert sizes["u_in"] == (D, 2) and sizes["v_out"] == (2, D)
    assert LowRankExperts(mlp_dim=64).rank == 8  # default H // 8


@pytest.mark.parametrize("widths", [(8, 4, 1, 0), (0, 0, 8, 3)])
def test_mixed_width_expert_e_is_an_mlp_of_width_e_outputs_and_gradients(widths):
    experts = MixedWidthExperts(mlp_dim=H, widths=widths)
    p = _stacked(experts)
    x = _x()

    def reference(p, x):
        outs = []
        for e, w in enumerate(widths):
            if w == 0:
                outs.append(x[e])
                continue
            sliced = {
                "w_in": p["w_in"][e : e + 1, :, :w],
                "b_in": p["b_in"][e : e + 1, :w],
                "w_out": p["w_out"][e : e + 1, :w],
                "b_out": p["b_out"][e : e + 1],
            }
            outs.append(vl.MlpExperts(mlp_dim=w)(sliced, x[e : e + 1], dtype=jnp.float32)[0])
        return jnp.stack(outs)

    fast = lambda p, x: experts(p, x, dtype=jnp.float32)  # noqa: E731
    np.testing.assert_allclose(fast(p, x), reference(p, x), atol=1e-6)
    loss = lambda fn: lambda p, x: jnp.sum(jnp.sin(fn(p, x)))  # noqa: E731
    got = jax.grad(loss(fast), argnums=(0, 1))(p, x)
    want = jax.grad(loss(reference), argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Hidden units past an expert's width never learn.
    for e, w in enumerate(widths):
        assert float(jnp.abs(got[0]["w_in"][e, :, w:]).max(initial=0)) == 0.0


def test_mixed_width_in_a_moe_layer_and_its_refusals():
    layer = vl.MoeLayer(
        num_experts=4,
        mlp_dim=H,
        expert_type="mixed_width",
        expert_options={"widths": (8, 4, 2, 0)},
        group_size=6,
    )
    x = jax.random.normal(jax.random.key(0), (2, 6, D))
    variables = layer.init(jax.random.key(1), x)
    assert variables["params"]["experts"]["w_in"].shape == (4, D, H)
    assert layer.apply(variables, x).output.shape == x.shape
    experts = MixedWidthExperts(mlp_dim=H, widths=(8, 4))
    with pytest.raises(ValueError, match="got 4 experts in one call but widths has 2 entries"):
        experts(_stacked(experts), _x(), dtype=jnp.float32)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("mixed_width", {"mlp_dim": 8}, r"widths=\(\) must name one width per expert"),
        ("mixed_width", {"mlp_dim": 8, "widths": (9,)}, r"widths\[0\]=9"),
        ("mixed_width", {"mlp_dim": 8, "widths": "88"}, "must be a sequence of ints"),
        ("low_rank", {"mlp_dim": 8, "rank": 0}, "rank=0"),
        ("low_rank", {"mlp_dim": 8, "activation": "tanh"}, "activation='tanh' must be one of"),
    ],
)
def test_bad_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        vl.get_expert_type(name, **options)
