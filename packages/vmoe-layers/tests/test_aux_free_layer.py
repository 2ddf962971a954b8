"""The aux-free router plugin (vmoe-router-aux-free, in this package's test extra) through the
MoE layer: its balancing bias lives in the `router_state` collection, steers the selection and
never the combine weights, and training steps that feed the updated state back balance a
skewed gate with no auxiliary loss at all. (The contract itself is tested with a test-local
router in test_router_state.py; 8 devices in test_multidevice.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import layers_reference as reference
import numpy as np

import vmoe_layers as vl

G, S, D, E, H = 2, 6, 5, 4, 8


def _top(scores_e, k):
    """The k experts of largest score, best first (ties: the lower index, as jax.lax.top_k)."""
    return [int(e) for e in np.argsort(-np.asarray(scores_e), kind="stable")[:k]]


def test_layer_outputs_and_gradients_equal_the_token_loop_reference():
    """BPR (by the chosen unbiased gates), K=2, weights normalised, a capacity that drops: each
    token's experts are its top-K of (gates + bias), filled K-major by priority, found one
    token at a time in numpy; its output the sum of its kept experts' outputs times their
    unbiased gates over the chosen ones' sum."""
    options = {"k": 2, "capacity_factor": 0.75, "normalize_weights": True, "priority_score": "max"}
    layer = vl.MoeLayer(E, H, router="aux_free", router_options=options, group_size=S)
    router = layer.make_router()
    x_gsd = jax.random.normal(jax.random.key(0), (G, S, D))
    params = jax.jit(layer.init)(jax.random.key(1), x_gsd)["params"]
    bias = 0.2 * jax.random.normal(jax.random.key(2), (E,))

    gates = np.asarray(jax.nn.softmax(x_gsd @ params["router"]["gate"], axis=-1))
    capacity, kept = router.capacity(S), []
    chosen = [[_top(gates[g, s] + bias, 2) for s in range(S)] for g in range(G)]
    assert chosen != [[_top(gates[g, s], 2) for s in range(S)] for g in range(G)]
    for g in range(G):
        order = _top([gates[g, s, chosen[g][s]].max() for s in range(S)], S)
        count = [0] * E
        for j in range(2):
            for s in order:
                e = chosen[g][s][j]
                if count[e] < capacity:
                    kept.append((g, s, e))
                count[e] += 1

    def fast(params, x_gsd):
        variables = {"params": params, vl.ROUTER_STATE: {"router": {"bias": bias}}}
        return layer.apply(variables, x_gsd).output

    def slow(params, x_gsd):
        rows = []
        for g in range(G):
            row = []
            for s in range(S):
                p = jax.nn.softmax(x_gsd[g, s] @ params["router"]["gate"])
                total = sum(p[e] for e in chosen[g][s])
                y = jnp.zeros(D)
                for e in (e for g_, s_, e in kept if (g_, s_) == (g, s)):
                    expert = reference.mlp_expert(params["experts"], e, x_gsd[g, s])
                    y = y + p[e] / total * expert
                row.append(y)
            rows.append(jnp.stack(row))
        return jnp.stack(rows)

    np.testing.assert_allclose(fast(params, x_gsd), slow(params, x_gsd), rtol=1e-5, atol=1e-6)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
    got = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(params, x_gsd)
    want = jax.grad(loss(slow), argnums=(0, 1))(params, x_gsd)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_training_steps_through_the_layer_balance_a_skewed_gate_without_an_aux_loss():
    """Most tokens' top gate is expert 0. Each step applies the layer in training with the
    router state mutable and feeds the returned state to the next (no optimizer: the params
    stay); the load's coefficient of variation falls to the sampling noise of 192 tokens."""
    layer = vl.MoeLayer(
        E,
        H,
        router="aux_free",
        router_options={"k": 1, "capacity_factor": 2.0, "bias_rate": 0.02},
        group_size=S,
    )
    variables = jax.jit(layer.init)(jax.random.key(1), jnp.zeros((32, S, D)))
    gate = variables["params"]["router"]["gate"].at[0, 0].add(1.0)  # x[..., 0] votes for 0
    params = {**variables["params"], "router": {"gate": gate}}
    assert set(params["router"]) == {"gate"}  # the bias is state, not a parameter

    @jax.jit
    def step(state, i):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(2), i), (32, S, D))
        out, updated = layer.apply(
            {"params": params, vl.ROUTER_STATE: state},
            x.at[..., 0].add(1.0),
            deterministic=False,
            mutable=[vl.ROUTER_STATE],
        )
        return updated[vl.ROUTER_STATE], out

    state, cvs = variables[vl.ROUTER_STATE], []
    for i in range(80):
        state, out = step(state, i)
        assert float(out.aux_loss) == 0.0 and out.aux_losses == {}
        load = out.metrics["expert_load"]
        cvs.append(float(jnp.std(load) / jnp.mean(load)))
    assert cvs[0] > 1.0, cvs[0]  # 1.3 at the start
    assert np.mean(cvs[-20:]) < 0.4 * cvs[0], cvs  # 0.22
    bias = state["router"]["bias"]
    assert float(bias[0]) < 0 < float(jnp.min(bias[1:]))
