"""Dropless routing: no choice dropped at any load, equal to top-K with room for everything."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_routing as vr
from vmoe_router_dropless import DroplessRouter, block_layout

G, S, D, E = 2, 12, 5, 4


def _inputs(seed=0):
    kx, kg, kw = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (G, S, D))
    w_edd = jax.random.normal(kw, (E, D, D)) / np.sqrt(D)
    return x, {"gate": jax.random.normal(kg, (D, E))}, w_edd


def _experts(w_edd, x_etd):
    return jnp.tanh(jnp.einsum("etd,edf->etf", x_etd, w_edd))


def _run(routing, w_edd, x):
    """dispatch -> experts -> combine, for blocks (params per block) and capacity buffers."""
    buffers = vr.dispatch(x, routing)
    if isinstance(routing, vr.BlockRouting):
        return vr.combine(_experts(w_edd[routing.block_expert], buffers), routing)
    g, e, c, d = buffers.shape
    y = _experts(w_edd, buffers.transpose(1, 0, 2, 3).reshape(e, g * c, d))
    return vr.combine(y.reshape(e, g, c, d).transpose(1, 0, 2, 3), routing)


def _reference(router, params, w_edd, x, rng=None):
    """A loop over tokens and their K choices: y[s] = sum_k gate_k * expert_k(x[s])."""
    expert, weight, _, _ = router.gating.choose(params, x, rng=rng, deterministic=rng is None)
    out = jnp.zeros_like(x)
    for g in range(G):
        for s in range(S):
            for j in range(router.k):
                y = jnp.tanh(x[g, s] @ w_edd[expert[g, s, j]])
                out = out.at[g, s].add(weight[g, s, j] * y)
    return out


def test_registered_through_its_entry_point():
    assert "dropless" in vr.available_routers()
    assert vr.ROUTERS.provider("dropless").startswith(
        'dropless (entry point "dropless = vmoe_router_dropless.plugin" from vmoe-router-dropless'
    )
    assert isinstance(vr.get_router("dropless", num_experts=4, k=2), DroplessRouter)


@pytest.mark.parametrize("block_size", [1, 3, 8, 64])
@pytest.mark.parametrize("load", ["random", "all_to_one", "two_experts"])
def test_block_layout_rows_are_distinct_and_blocks_hold_one_expert(block_size, load):
    m = 50
    rs = np.random.RandomState(block_size)
    expert = {
        "random": rs.randint(0, E, m),
        "all_to_one": np.full(m, 2),
        "two_experts": rs.choice([0, 3], m),
    }[load]
    row, block_expert = block_layout(jnp.asarray(expert, jnp.int32), E, block_size)
    row, block_expert = np.asarray(row), np.asarray(block_expert)
    assert len(block_expert) == -(-(m + E * (block_size - 1)) // block_size)
    assert len(set(row.tolist())) == m and row.max() < len(block_expert) * block_size
    np.testing.assert_array_equal(block_expert[row // block_size], expert)
    # Within an expert, choices keep their order (the nested-order property of a stable sort).
    for e in range(E):
        assert (np.diff(row[expert == e]) > 0).all()


@pytest.mark.parametrize("k", [1, 2])
def test_outputs_and_gradients_equal_the_token_loop_reference(k):
    router = DroplessRouter(num_experts=E, k=k, block_size=4)
    x, params, w_edd = _inputs(1)
    rng = jax.random.key(7)

    def fast(p, w, x):
        return _run(router(p, x, rng=rng, deterministic=False), w, x)

    def slow(p, w, x):
        return _reference(router, p, w, x, rng)

    np.testing.assert_allclose(fast(params, w_edd, x), slow(params, w_edd, x), atol=1e-6)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
    got = jax.grad(loss(fast), argnums=(0, 1, 2))(params, w_edd, x)
    want = jax.grad(loss(slow), argnums=(0, 1, 2))(params, w_edd, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("hot_experts", [1, 2])
def test_no_token_dropped_even_when_every_token_picks_the_same_experts(hot_experts):
    router = DroplessRouter(num_experts=E, k=hot_experts, block_size=5)
    x, params, w_edd = _inputs(2)
    x = jnp.abs(x)  # with a large positive gate column, every token's top experts are the same
    params = {
        "gate": params["gate"].at[:, :hot_experts].set(100.0 * jnp.arange(1, 3)[:hot_experts])
    }
    routing = router(params, x)
    np.testing.assert_array_equal(np.bincount(routing.expert, minlength=E)[:hot_experts], G * S)
    assert float(routing.no_expert_fraction()) == 0.0
    assert float(routing.metrics["max_load_ratio"]) == pytest.approx(E / hot_experts)
    np.testing.assert_allclose(
        _run(routing, w_edd, x), _reference(router, params, w_edd, x), atol=1e-6
    )
    # top_k at the paper's C=1.05 keeps only C of the S tokens of each hot expert.
    top_k = vr.TopKRouter(num_experts=E, k=hot_experts, capacity_factor=1.05)
    dropped = 1 - top_k.capacity(S) / S
    assert float(top_k(params, x).metrics["dropped_fraction"]) == pytest.approx(dropped)
    assert dropped > 0.4


def test_equals_top_k_when_its_capacity_drops_nothing():
    router = DroplessRouter(num_experts=E, k=2, block_size=3)
    top_k = vr.TopKRouter(num_experts=E, k=2, capacity_factor=E / 2)  # C = S: room for all
    x, params, w_edd = _inputs(3)
    rng = jax.random.key(3)

    def run(r):
        return lambda p, w, x: _run(r(p, x, rng=rng, deterministic=False), w, x)

    assert float(top_k(params, x, rng=rng, deterministic=False).metrics["dropped_fraction"]) == 0
    # Blocks vs capacity buffers sum in another order: values near 0 need an atol (3.7e-8 seen).
    np.testing.assert_allclose(
        run(router)(params, w_edd, x), run(top_k)(params, w_edd, x), rtol=1e-6, atol=1e-6
    )
    a, b = (
        router(params, x, rng=rng, deterministic=False),
        top_k(params, x, rng=rng, deterministic=False),
    )
    assert float(a.aux_loss) == pytest.approx(float(b.aux_loss))
    loss = lambda r: lambda *args: jnp.sum(run(r)(*args) ** 2)  # noqa: E731
    got = jax.grad(loss(router), argnums=(0, 1, 2))(params, w_edd, x)
    want = jax.grad(loss(top_k), argnums=(0, 1, 2))(params, w_edd, x)
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(u, v, atol=1e-5)


def test_normalized_weights_make_every_tokens_weights_sum_to_one():
    x, params, _ = _inputs(4)
    raw = DroplessRouter(num_experts=E, k=2, block_size=3)
    routing = raw.replace(normalize_weights=True)(params, x)
    per_token = np.zeros(G * S)
    np.add.at(per_token, np.asarray(routing.token), np.asarray(routing.weight))
    np.testing.assert_allclose(per_token, 1.0, atol=1e-6)
    # The raw gates of the same choices, over their sum.
    expert, weight, _, _ = raw.gating.choose(params, x)
    expected = (weight / jnp.sum(weight, -1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(np.asarray(routing.weight), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(routing.expert), np.asarray(expert).reshape(-1))


def test_to_routing_is_the_same_decision_at_capacity_s():
    router = DroplessRouter(num_experts=E, k=2, block_size=4)
    x, params, w_edd = _inputs(4)
    routing = router(params, x)
    reference = routing.to_routing()
    assert reference.capacity == S and bool(reference.valid.all())
    np.testing.assert_allclose(_run(routing, w_edd, x), _run(reference, w_edd, x), atol=1e-6)
    np.testing.assert_allclose(
        _run(routing, w_edd, x), _run(reference.to_dense(), w_edd, x), atol=1e-6
    )


def test_memory_is_tokens_times_k_plus_padding_whatever_the_load():
    router = DroplessRouter(num_experts=8, k=2, block_size=16)
    x = jnp.ones((4, 64, 3))  # every token has the same gates: the worst load
    routing = router(router.init(jax.random.key(0), 3), x)
    m = 4 * 64 * 2
    assert routing.num_blocks * routing.block_size <= m + 8 * 16
    assert vr.dispatch(x, routing).shape == (routing.num_blocks, 16, 3)
    assert 0 <= float(routing.metrics["padding_fraction"]) < 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_experts=4, k=5), "k=5 must be <= num_experts=4"),
        (dict(num_experts=4, block_size=0), "block_size=0"),
        (dict(num_experts=4, noise_std=0.0), "load_loss_weight=0.005 needs noise_std > 0"),
        (dict(num_experts=4, capacity_factor=1.0), r"unknown option\(s\) \['capacity_factor'\]"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        vr.get_router("dropless", **options)


def test_replace_and_jit():
    router = DroplessRouter(num_experts=E, k=2).replace(k=1, block_size=2)
    assert (router.k, router.block_size) == (1, 2)
    x, params, _ = _inputs()
    routing = jax.jit(lambda p, x: router(p, x))(params, x)
    assert routing.token.shape == (G * S,)


def test_metrics_are_group_means_so_shards_combine_into_the_batch():
    """Group 0: every token picks experts 0 and 1 (a hand-computed worst load); group 1: the
    gates of random tokens. Routing the groups one by one (as two devices would) and averaging
    gives the metrics of routing them together, padding aside."""
    router = DroplessRouter(num_experts=E, k=2, block_size=4)
    x, params, _ = _inputs(5)
    x = x[:2]
    x = x.at[0].set(jnp.abs(x[0]))  # positive tokens: the two large gate columns win
    gate_hot = params["gate"].at[:, 0].set(100.0).at[:, 1].set(50.0)
    routing_hot = router({"gate": gate_hot}, x[:1])
    # Every one of the S*K choices of group 0 is expert 0 or 1: each holds S of 2S choices.
    assert float(routing_hot.metrics["max_load_ratio"]) == pytest.approx(E / 2)
    np.testing.assert_allclose(routing_hot.metrics["expert_load"][:2], [0.5, 0.5])

    together = router({"gate": gate_hot}, x)
    apart = [router({"gate": gate_hot}, x[i : i + 1]) for i in range(2)]
    for name in ("expert_load", "max_load_ratio", "dropped_fraction", "no_expert_fraction"):
        mean = (np.asarray(apart[0].metrics[name]) + np.asarray(apart[1].metrics[name])) / 2
        np.testing.assert_allclose(together.metrics[name], mean, rtol=1e-6, err_msg=name)
    counts = np.bincount(np.asarray(apart[1].expert), minlength=E)
    assert float(apart[1].metrics["max_load_ratio"]) == pytest.approx(counts.max() * E / (2 * S))
