"""The MoE layer equals a loop over tokens and their kept experts (output and gradients)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import layers_reference as reference
import numpy as np
import pytest

import vmoe_layers as vl
import vmoe_routing

# Small enough to trace a per-token loop: B=4 images x T=8 tokens, D=6, E=4 experts, H=12.
B, T, D, E, H = 4, 8, 6, 4, 12
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32, different summation order only

ROUTERS = {
    "top_k k=1": ("top_k", {"k": 1}),
    "top_k k=2": ("top_k", {"k": 2}),
    "bpr k=2": ("bpr", {"k": 2}),
    "bpr k=1 sum": ("bpr", {"k": 1, "priority_score": "sum"}),
    "hash k=2": ("hash", {"k": 2}),
}
CAPACITY_FACTORS = (0.5, 1.0, 4.0)  # drops many, drops some, drops none
# The default run: every router where capacity drops many tokens, and top_k k=2 at each
# capacity; the other (router, capacity) pairs are `extended` (nox -s tests-extended).
LOOP_CASES = [
    pytest.param(
        router_id,
        capacity_factor,
        id=f"{router_id}-{capacity_factor}",
        marks=() if capacity_factor == 0.5 or router_id == "top_k k=2" else (pytest.mark.extended,),
    )
    for router_id in ROUTERS
    for capacity_factor in CAPACITY_FACTORS
]


def _x(seed=0, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def _layer(router, options, capacity_factor, **kwargs):
    return vl.MoeLayer(
        num_experts=E,
        mlp_dim=H,
        router=router,
        router_options={**options, "capacity_factor": capacity_factor},
        **kwargs,
    )


def _params(layer, x, seed=1):
    params = layer.init(jax.random.key(seed), x)["params"]
    # Give the router a gate big enough that routing is decisive (no near-ties), if it has one.
    if "gate" in params["router"]:
        params["router"] = {"gate": 3.0 * params["router"]["gate"]}
    return params


def _fast_and_reference(layer, params, x, group_size):
    router = layer.make_router()
    expert_one = {"mlp": reference.mlp_expert, "glu": reference.glu_expert}[layer.expert_type]
    x_gsd = x.reshape(-1, group_size, x.shape[-1])
    choices = reference.kept_choices(router, params["router"], x_gsd)
    cotangent = _x(seed=7, shape=x.shape)

    def fast_loss(params, x):
        out = layer.apply({"params": params}, x)
        return jnp.sum(out.output * cotangent) + out.aux_loss, out

    def reference_loss(params, x):
        y_gsd, aux_loss = reference.moe_by_loop(
            router, expert_one, params, x.reshape(x_gsd.shape), choices
        )
        y = y_gsd.reshape(x.shape)
        return jnp.sum(y * cotangent) + aux_loss, y

    # The layer as one program (op by op, each case compiled every op of the layer anew); the
    # reference stays op by op: its token loop would unroll into a large program.
    fast_step = jax.jit(jax.value_and_grad(fast_loss, argnums=(0, 1), has_aux=True))
    (fast, out), fast_grads = fast_step(params, x)
    (ref, y_ref), ref_grads = jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True)(
        params, x
    )
    return out, y_ref, (fast, fast_grads), (ref, ref_grads), choices[2]


@pytest.mark.parametrize("router_id, capacity_factor", LOOP_CASES)
def test_output_and_gradients_equal_the_token_loop(router_id, capacity_factor):
    router, options = ROUTERS[router_id]
    layer = _layer(router, options, capacity_factor)
    x = _x()
    params = _params(layer, x)
    out, y_ref, fast, ref, kept = _fast_and_reference(layer, params, x, group_size=T)
    np.testing.assert_allclose(out.output, y_ref, **TOL)
    np.testing.assert_allclose(fast[0], ref[0], **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), fast[1], ref[1])
    # The case is the one it claims to be: drops happen exactly when capacity is short.
    dropped = 1.0 - kept.mean()
    assert float(out.metrics["dropped_fraction"]) == pytest.approx(dropped)
    if capacity_factor == 0.5:
        assert dropped >= 0.4
    if capacity_factor == 4.0:
        assert dropped == 0


def test_groups_spanning_several_images_equal_the_token_loop():
    layer = _layer("bpr", {"k": 2}, 1.0, group_size=2 * T)
    x = _x()
    params = _params(layer, x)
    out, y_ref, fast, ref, _ = _fast_and_reference(layer, params, x, group_size=2 * T)
    np.testing.assert_allclose(out.output, y_ref, **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), fast[1], ref[1])


def test_glu_experts_equal_the_token_loop():
    layer = _layer("top_k", {"k": 2}, 1.0, expert_type="glu")
    x = _x()
    params = _params(layer, x)
    assert set(params["experts"]) == {"w_gate", "w_up", "w_out"}
    out, y_ref, fast, ref, _ = _fast_and_reference(layer, params, x, group_size=T)
    np.testing.assert_allclose(out.output, y_ref, **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), fast[1], ref[1])


def test_bfloat16_dispatch_rounds_expert_inputs_and_outputs_only():
    """As the original release's bfloat16 dispatcher: each expert sees its tokens rounded to
    bfloat16 and its outputs are rounded to bfloat16 before the float32 combine; the router
    still gates the float32 tokens."""
    layer = _layer("top_k", {"k": 2}, 1.0, dispatch_dtype=jnp.bfloat16)
    x = _x()
    params = _params(layer, x)
    out = layer.apply({"params": params}, x)
    x_gsd = x.reshape(-1, T, D)

    def rounded(a):
        return a.astype(jnp.bfloat16).astype(jnp.float32)

    def expert_one(p, e, x_d):
        return rounded(reference.mlp_expert(p, e, rounded(x_d)))

    router = layer.make_router()
    choices = reference.kept_choices(router, params["router"], x_gsd)
    y_ref, _ = reference.moe_by_loop(router, expert_one, params, x_gsd, choices)
    np.testing.assert_allclose(out.output, y_ref.reshape(x.shape), **TOL)
    plain = layer.clone(dispatch_dtype=None).apply({"params": params}, x)
    assert out.output.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out.output - plain.output))) > 1e-4  # the rounding is real


def test_unknown_dispatch_dtype_is_named():
    layer = _layer("top_k", {"k": 2}, 1.0, dispatch_dtype="bfloat17")
    with pytest.raises(ValueError, match="dispatch_dtype='bfloat17'"):
        layer.init(jax.random.key(0), _x())


class DenseMlp(nn.Module):
    """The ViT MLP block written with flax Dense layers: an independent dense reference."""

    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.mlp_dim)(x))
        return nn.Dense(x.shape[-1])(h)


def _copy_dense_into_every_expert(moe_params, dense_params):
    stack = lambda a: jnp.broadcast_to(a, (E, *a.shape))  # noqa: E731
    moe_params = dict(moe_params)
    moe_params["experts"] = {
        "w_in": stack(dense_params["Dense_0"]["kernel"]),
        "b_in": stack(dense_params["Dense_0"]["bias"]),
        "w_out": stack(dense_params["Dense_1"]["kernel"]),
        "b_out": stack(dense_params["Dense_1"]["bias"]),
    }
    return moe_params


@pytest.mark.parametrize(
    "router, options",
    [
        ("top_k", {"k": E}),  # all experts: the raw softmax weights sum to 1
        ("bpr", {"k": E}),
        ("hash", {"k": 1}),  # weight 1/K per choice
        ("hash", {"k": 2}),
    ],
)
def test_identical_experts_without_drops_equal_the_dense_mlp(router, options):
    x = _x(seed=3)
    dense = DenseMlp(H)
    dense_params = dense.init(jax.random.key(4), x)["params"]
    dense_params = jax.tree.map(lambda a: a + 0.1, dense_params)  # non-zero biases matter too
    layer = _layer(router, options, capacity_factor=float(E))  # capacity S: nothing dropped
    params = _copy_dense_into_every_expert(_params(layer, x), dense_params)
    out = layer.apply({"params": params}, x)
    assert float(out.metrics["dropped_fraction"]) == 0
    np.testing.assert_allclose(out.output, dense.apply({"params": dense_params}, x), **TOL)


def test_returns_the_routers_aux_loss_and_metrics():
    layer = _layer("top_k", {"k": 2, "gshard_loss_weight": 0.01}, 1.0)
    x = _x()
    params = _params(layer, x)
    out = layer.apply({"params": params}, x)
    routing = layer.make_router()(params["router"], x, deterministic=True)
    np.testing.assert_allclose(out.aux_loss, routing.aux_loss, rtol=1e-6)
    assert set(out.aux_losses) == {"importance", "load", "gshard"}
    assert set(out.metrics) == {
        "dropped_fraction",
        "no_expert_fraction",
        "expert_load",
        "expert_fill",
    }
    assert out.metrics["expert_load"].shape == (E,)


def test_per_call_k_and_capacity_equal_a_layer_built_with_them():
    x = _x()
    layer = _layer("bpr", {"k": 2}, 1.0)
    params = _params(layer, x)
    before = jax.tree.map(np.asarray, params)
    overridden = layer.apply({"params": params}, x, k=1, capacity_factor=0.25)
    built = _layer("bpr", {"k": 1}, 0.25).apply({"params": params}, x)
    np.testing.assert_allclose(overridden.output, built.output, **TOL)
    assert float(overridden.metrics["dropped_fraction"]) > 0
    default = layer.apply({"params": params}, x)
    assert not np.allclose(default.output, overridden.output)
    jax.tree.map(np.testing.assert_array_equal, params, before)


def test_training_noise_uses_the_gating_rng():
    layer = _layer("top_k", {"k": 1, "noise_std": 50.0}, 4.0)
    x = _x()
    params = _params(layer, x)

    def train(seed):
        rngs = {"gating": jax.random.key(seed)}
        return layer.apply({"params": params}, x, deterministic=False, rngs=rngs).output

    np.testing.assert_array_equal(train(0), train(0))
    assert not np.allclose(train(0), train(1))
    assert not np.allclose(train(0), layer.apply({"params": params}, x).output)


def test_training_capacity_factor_applies_when_not_deterministic():
    options = {"k": 1, "noise_std": 0.0, "load_loss_weight": 0.0, "eval_capacity_factor": 4.0}
    layer = _layer("top_k", options, capacity_factor=0.25)
    x = _x()
    params = _params(layer, x)
    train = layer.apply({"params": params}, x, deterministic=False)
    evaluation = layer.apply({"params": params}, x)
    assert float(train.metrics["dropped_fraction"]) > 0
    assert float(evaluation.metrics["dropped_fraction"]) == 0


def test_dropout_zeroes_and_rescales_outputs_in_training_only():
    options = {"k": 1, "noise_std": 0.0, "load_loss_weight": 0.0}
    layer = _layer("top_k", options, 4.0, dropout_rate=0.5)
    x = _x()
    params = _params(layer, x)
    clean = layer.apply({"params": params}, x).output
    dropped = layer.apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}
    ).output
    zero = dropped == 0
    assert 0.3 < float(zero.mean()) < 0.7
    np.testing.assert_allclose(dropped[~zero], 2.0 * clean[~zero], rtol=1e-6)


def _equations(jaxpr):
    """Every equation of a jaxpr, nested ones (jit, custom_jvp, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_bfloat16_compute_with_float32_params():
    x = _x()
    layer = _layer("bpr", {"k": 2}, 4.0)
    params = _params(layer, x)
    low = layer.clone(dtype=jnp.bfloat16).apply({"params": params}, x)
    high = layer.apply({"params": params}, x)
    assert low.output.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.output.astype(jnp.float32), high.output, rtol=0.05, atol=0.05)
    # The expert matmuls really run in bf16: their inputs (tokens and weights) are bf16.
    jaxpr = jax.make_jaxpr(lambda p: layer.clone(dtype=jnp.bfloat16).apply({"params": p}, x))
    expert_dots = [
        eqn
        for eqn in _equations(jaxpr(params).jaxpr)
        if eqn.primitive.name == "dot_general"
        and tuple(eqn.invars[1].aval.shape) in {(E, D, H), (E, H, D)}
    ]
    assert len(expert_dots) == 2
    for eqn in expert_dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16]
    grads = jax.grad(
        lambda p: jnp.sum(layer.clone(dtype=jnp.bfloat16).apply({"params": p}, x).output)
    )(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_param_dtype_sets_the_expert_params_dtype():
    layer = _layer("top_k", {"k": 1}, 1.0, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), _x())["params"]
    assert {a.dtype for a in jax.tree.leaves(params["experts"])} == {jnp.dtype(jnp.bfloat16)}


def test_each_expert_is_initialised_independently():
    params = _layer("top_k", {"k": 1}, 1.0).init(jax.random.key(0), _x())["params"]
    w_in = np.asarray(params["experts"]["w_in"])
    assert w_in.shape == (E, D, H)
    assert all(not np.allclose(w_in[0], w_in[e]) for e in range(1, E))
    # xavier_uniform over one expert's [D, H]: bound sqrt(6 / (D + H)), not the stack's fan-in.
    bound = np.sqrt(6 / (D + H))
    assert np.abs(w_in).max() <= bound
    assert np.abs(w_in).max() > 0.8 * bound


@pytest.mark.parametrize("group_size", [5, 0, -8])
def test_group_size_must_divide_the_tokens(group_size):
    layer = _layer("top_k", {"k": 1}, 1.0, group_size=group_size)
    with pytest.raises(ValueError, match=rf"group_size={group_size} does not divide the 32 tokens"):
        layer.init(jax.random.key(0), _x())


def test_a_numpy_integer_group_size_is_accepted():
    layer = _layer("top_k", {"k": 1}, 1.0, group_size=np.int64(4))
    params = layer.init(jax.random.key(0), _x())["params"]
    reference = _layer("top_k", {"k": 1}, 1.0, group_size=4).apply({"params": params}, _x())
    np.testing.assert_array_equal(layer.apply({"params": params}, _x()).output, reference.output)


@pytest.mark.parametrize("group_size", [True, 4.0, "4"])
def test_a_group_size_that_is_not_an_integer_is_rejected(group_size):
    layer = _layer("top_k", {"k": 1}, 1.0, group_size=group_size)
    with pytest.raises(ValueError, match=rf"group_size={group_size!r} must be an integer >= 1"):
        layer.init(jax.random.key(0), _x())


def test_a_traced_capacity_factor_must_be_a_static_number():
    layer = _layer("top_k", {"k": 1}, 1.0)
    params = _params(layer, _x())
    apply = jax.jit(lambda p, c: layer.apply({"params": p}, _x(), capacity_factor=c))
    with pytest.raises(ValueError, match=r"capacity_factor=.*Tracer.* must be a static Python"):
        apply(params, 0.5)


@dataclasses.dataclass(frozen=True)
class KOnlyRouter:
    """A plugin-style router with k but no capacity factor (routes every token to expert 0)."""

    num_experts: int
    k: int = 1

    def init(self, rng, d_model):
        return {}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def test_a_router_without_a_capacity_factor_says_what_it_supports():
    with pytest.raises(
        ValueError, match=r"router KOnlyRouter has no field 'capacity_factor'.*supports: \['k'\]"
    ):
        vl.moe.override_router(KOnlyRouter(4), capacity_factor=0.5)
    assert vl.moe.override_router(KOnlyRouter(4), k=2) == KOnlyRouter(4, k=2)


def test_unknown_expert_type_lists_the_installed_ones():
    layer = _layer("top_k", {"k": 1}, 1.0, expert_type="mlpp")
    with pytest.raises(ValueError, match=r"unknown expert type 'mlpp'.*'glu',.*'mlp'"):
        layer.init(jax.random.key(0), _x())


def test_unknown_router_lists_the_installed_ones():
    layer = _layer("top_q", {"k": 1}, 1.0)
    with pytest.raises(ValueError, match=r"unknown router 'top_q'.*'top_k'"):
        layer.init(jax.random.key(0), _x())


def test_router_options_may_not_set_num_experts():
    layer = vl.MoeLayer(num_experts=E, mlp_dim=H, router_options={"num_experts": 8})
    with pytest.raises(ValueError, match=r"must not set num_experts=8"):
        layer.init(jax.random.key(0), _x())


def test_training_with_a_noisy_router_needs_a_gating_rng():
    layer = _layer("top_k", {"k": 1}, 1.0)
    params = _params(layer, _x())
    with pytest.raises(ValueError, match=r"needs rngs=\{'gating': key\}"):
        layer.apply({"params": params}, _x(), deterministic=False)


def test_dropout_rate_out_of_range_is_rejected():
    layer = _layer("top_k", {"k": 1}, 1.0, dropout_rate=1.0)
    with pytest.raises(ValueError, match=r"dropout_rate=1.0 must be in \[0, 1\)"):
        layer.init(jax.random.key(0), _x())


def test_a_router_option_error_names_the_option():
    layer = _layer("top_k", {"k": 9}, 1.0)
    with pytest.raises(ValueError, match=r"k=9 must be <= num_experts=4"):
        layer.init(jax.random.key(0), _x())


def test_hash_router_is_the_installed_plugin():
    assert "hash" in vmoe_routing.available_routers()


def test_einsum_dispatch_path_equals_the_index_path():
    index_layer = _layer("bpr", {"k": 2}, 0.5)
    einsum_layer = _layer("bpr", {"k": 2}, 0.5, dispatch_path="einsum")
    x = _x()
    params = _params(index_layer, x)

    def loss(layer, params, x):
        out = layer.apply({"params": params}, x)
        return jnp.sum(out.output * _x(seed=3)) + out.aux_loss

    index = jax.value_and_grad(lambda p, x: loss(index_layer, p, x), argnums=(0, 1))(params, x)
    einsum = jax.value_and_grad(lambda p, x: loss(einsum_layer, p, x), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(index[0], einsum[0], **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), index[1], einsum[1])


def test_unknown_dispatch_path_is_rejected():
    layer = _layer("top_k", {"k": 1}, 1.0, dispatch_path="onehot")
    with pytest.raises(
        ValueError, match=r"dispatch_path='onehot' must be one of \('index', 'einsum'\)"
    ):
        layer.init(jax.random.key(0), _x())
