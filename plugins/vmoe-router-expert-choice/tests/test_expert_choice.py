"""Expert-choice routing: found by its entry point, full buffers, equal to a slow reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_routing as vr
from vmoe_router_expert_choice import ExpertChoiceRouter

G, S, D, E = 2, 12, 5, 4


def _inputs(seed=0):
    kx, kg, kw = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (G, S, D))
    params = {"gate": jax.random.normal(kg, (D, E))}
    w_edd = jax.random.normal(kw, (E, D, D)) / np.sqrt(D)
    return x, params, w_edd


def _experts(w_edd, x_etd):
    return jnp.tanh(jnp.einsum("etd,edf->etf", x_etd, w_edd))


def _fast(router, params, w_edd, x):
    routing = router(params, x)
    buffers = vr.dispatch(x, routing)  # [G, E, C, D]
    g, e, c, d = buffers.shape
    y = _experts(w_edd, buffers.transpose(1, 0, 2, 3).reshape(e, g * c, d))
    return vr.combine(y.reshape(e, g, c, d).transpose(1, 0, 2, 3), routing)


def _reference(router, params, w_edd, x):
    """Loops over groups and experts: sort the expert's gates, keep the first C tokens."""
    gates = jax.nn.softmax(jnp.einsum("gsd,de->gse", x, params["gate"]), axis=-1)
    c = router.capacity(S)
    out = jnp.zeros_like(x)
    for g in range(G):
        for e in range(E):
            chosen = jnp.argsort(-gates[g, :, e], stable=True)[:c]
            y = jnp.tanh(x[g, chosen] @ w_edd[e])
            out = out.at[g, chosen].add(gates[g, chosen, e][:, None] * y)
    return out


def test_registered_through_its_entry_point():
    assert "expert_choice" in vr.available_routers()
    assert vr.ROUTERS.provider("expert_choice").startswith(
        'expert_choice (entry point "expert_choice = vmoe_router_expert_choice.plugin" '
        "from vmoe-router-expert-choice"
    )
    assert isinstance(vr.get_router("expert_choice", num_experts=4), ExpertChoiceRouter)


@pytest.mark.parametrize(("k", "factor"), [(1, 1.0), (2, 1.05), (1, 0.5), (4, 2.0)])
def test_every_expert_processes_exactly_c_distinct_tokens(k, factor):
    router = ExpertChoiceRouter(num_experts=E, k=k, capacity_factor=factor)
    x, params, _ = _inputs()
    routing = router(params, x)
    c = vr.compute_capacity(S, E, k, factor)
    assert routing.capacity == c and routing.token.shape == (G, E * c)
    assert bool(routing.valid.all())
    for g in range(G):
        expert, token = np.asarray(routing.expert[g]), np.asarray(routing.token[g])
        np.testing.assert_array_equal(np.bincount(expert, minlength=E), [c] * E)
        for e in range(E):
            assert len(set(token[expert == e].tolist())) == c
    buffers = vr.dispatch(x, routing)
    assert bool((jnp.abs(buffers).sum(-1) > 0).all())  # no empty slot anywhere


def test_outputs_and_gradients_equal_the_slow_reference():
    router = ExpertChoiceRouter(num_experts=E, k=2, capacity_factor=0.75)
    x, params, w_edd = _inputs(1)
    np.testing.assert_allclose(
        _fast(router, params, w_edd, x), _reference(router, params, w_edd, x), atol=1e-6
    )

    def loss(fn):
        return lambda p, w, x: jnp.sum(jnp.sin(fn(router, p, w, x)))

    fast = jax.grad(loss(_fast), argnums=(0, 1, 2))(params, w_edd, x)
    slow = jax.grad(loss(_reference), argnums=(0, 1, 2))(params, w_edd, x)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert float(jnp.abs(fast[0]["gate"]).max()) > 0  # the gate learns through the weights


def test_full_capacity_is_the_dense_softmax_mixture():
    router = ExpertChoiceRouter(num_experts=E, k=E, capacity_factor=1.0)  # C = S
    x, params, w_edd = _inputs(2)
    gates = jax.nn.softmax(jnp.einsum("gsd,de->gse", x, params["gate"]), -1)
    dense = jnp.einsum("gse,gsef->gsf", gates, jnp.tanh(jnp.einsum("gsd,edf->gsef", x, w_edd)))
    np.testing.assert_allclose(_fast(router, params, w_edd, x), dense, atol=1e-6)


def test_weights_are_the_gates_of_the_chosen_tokens():
    router = ExpertChoiceRouter(num_experts=E, k=1)
    x, params, _ = _inputs(3)
    routing = router(params, x)
    gates = router.gates(params, x)
    rows = jnp.arange(G)[:, None]
    np.testing.assert_array_equal(routing.weight, gates[rows, routing.token, routing.expert])


def test_metrics_count_experts_per_token():
    router = ExpertChoiceRouter(num_experts=E, k=1, capacity_factor=1.0)
    x, params, _ = _inputs(4)
    routing = router(params, x)
    counts = np.zeros((G, S), int)
    for g in range(G):
        np.add.at(counts[g], np.asarray(routing.token[g]), 1)
    expected = np.bincount(counts.ravel(), minlength=E + 1) / (G * S)
    m = routing.metrics
    np.testing.assert_allclose(m["experts_per_token"], expected, atol=1e-7)
    np.testing.assert_allclose(m["no_expert_fraction"], expected[0], atol=1e-7)
    np.testing.assert_allclose(m["no_expert_fraction"], routing.no_expert_fraction(), atol=1e-7)
    np.testing.assert_allclose(m["mean_experts_per_token"], routing.capacity * E / S, rtol=1e-6)
    np.testing.assert_allclose(m["expert_load"], [1 / E] * E, rtol=1e-6)
    np.testing.assert_allclose(m["expert_fill"], [1.0] * E)


def test_eval_capacity_factor_applies_when_deterministic_and_jit_works():
    router = ExpertChoiceRouter(num_experts=E, capacity_factor=1.0, eval_capacity_factor=0.5)
    x, params, _ = _inputs()
    train = jax.jit(lambda p, x: router(p, x, deterministic=False))(params, x)
    assert (train.capacity, router(params, x).capacity) == (3, 2)  # ceil(12/4), ceil(6/4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_experts=4, k=5), "k=5 must be <= num_experts=4"),
        (dict(num_experts=4, capacity_factor=0), "capacity_factor=0 must be a finite number > 0"),
        (dict(num_experts=0), "num_experts=0"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        vr.get_router("expert_choice", **options)


def test_wrong_d_model():
    router = ExpertChoiceRouter(num_experts=2)
    with pytest.raises(ValueError, match="x has d_model=3 but the router params expect 5"):
        router(router.init(jax.random.key(0), 5), jnp.ones((1, 4, 3)))
