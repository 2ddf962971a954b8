"""Auxiliary-loss-free routing: a bias on the selection scores only, kept as router state and
moved towards balance after every training step.

Tested here with vmoe-routing alone (route, dispatch, experts, combine, update the state);
vmoe-layers' tests run it through `MoeLayer` (its `router_state` collection) and under every
sharding strategy on 8 devices.

Shape legend: G groups, S tokens per group, D model dim, E experts, K choices per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_plugins
import vmoe_routing as vr
from vmoe_router_aux_free import BALANCED_RTOL, AuxFreeRouter, bias_step

G, S, D, E = 2, 6, 5, 4


def _inputs(seed=0):
    kx, kg, kw, kb = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (G, S, D))
    w_edd = jax.random.normal(kw, (E, D, D)) / np.sqrt(D)
    # A bias as large as the gates' spread: it reroutes many tokens to lower-gate experts.
    bias = 0.5 * jax.random.normal(kb, (E,))
    return x, {"gate": jax.random.normal(kg, (D, E))}, w_edd, bias


def _experts(w_edd, x_etd):
    return jnp.tanh(jnp.einsum("etd,edf->etf", x_etd, w_edd))


def _moe(routing, w_edd, x_gsd):
    """dispatch -> every expert on its buffer -> combine."""
    buffers = vr.dispatch(x_gsd, routing)
    g, e, c, d = buffers.shape
    y = _experts(w_edd, buffers.transpose(1, 0, 2, 3).reshape(e, g * c, d))
    return vr.combine(y.reshape(e, g, c, d).transpose(1, 0, 2, 3), routing)


def _top(scores_e, k):
    """The k experts of largest score, best first (ties: the lower index, as jax.lax.top_k)."""
    return [int(e) for e in np.argsort(-np.asarray(scores_e), kind="stable")[:k]]


def _reference_choices(gate, bias, x_gsd, k, capacity, priority_score):
    """(token, expert, slot-kept) per group, found one token at a time in numpy: each token's K
    experts are its top-K of (softmax gates + bias); buffers are filled K-major, in token order
    or by descending priority (the max / sum of the token's chosen *unbiased* gates)."""
    gates = np.asarray(jax.nn.softmax(np.asarray(x_gsd) @ np.asarray(gate), axis=-1))
    bias = np.asarray(bias)
    kept = []
    for g in range(gates.shape[0]):
        choices, priorities = [], []
        for s in range(gates.shape[1]):
            chosen = _top(gates[g, s] + bias, k)
            choices.append(chosen)
            raw = gates[g, s, chosen]
            priorities.append(raw.max() if priority_score == "max" else raw.sum())
        if priority_score is None:
            order = list(range(gates.shape[1]))
        else:
            order = _top(priorities, len(priorities))  # descending, ties in token order
        count = [0] * E
        for j in range(k):
            for s in order:
                e = choices[s][j]
                if count[e] < capacity:
                    kept.append((g, s, e))
                count[e] += 1
    return kept


def _moe_by_token_loop(params, w_edd, x_gsd, kept, normalize, chosen):
    """y[g, s] = sum over token (g, s)'s kept experts e of w_e * expert_e(x[g, s]), w the raw
    softmax gate of e (over the sum of the token's K chosen raw gates with `normalize`):
    traced, so gradients reach the gate, the experts and x."""
    rows = []
    for g in range(x_gsd.shape[0]):
        row = []
        for s in range(x_gsd.shape[1]):
            gates = jax.nn.softmax(x_gsd[g, s] @ params["gate"])
            total = sum(gates[e] for e in chosen[g][s]) if normalize else 1.0
            y = jnp.zeros(x_gsd.shape[-1])
            for g_, s_, e in kept:
                if (g_, s_) == (g, s):
                    y = y + gates[e] / total * jnp.tanh(x_gsd[g, s] @ w_edd[e])
            row.append(y)
        rows.append(jnp.stack(row))
    return jnp.stack(rows)


def test_registered_through_its_entry_point():
    assert "aux_free" in vr.available_routers()
    assert vr.ROUTERS.provider("aux_free").startswith(
        'aux_free (entry point "aux_free = vmoe_router_aux_free.plugin" from vmoe-router-aux-free'
    )
    router = vr.get_router("aux_free", num_experts=E, k=2)
    assert isinstance(router, AuxFreeRouter) and vr.has_state(router)


def test_without_the_plugin_the_error_names_the_package_to_install():
    assert vr.PLUGIN_ROUTERS["aux_free"] == "vmoe-router-aux-free"
    vr.available_routers()  # load the entry points, then take this one away: "uninstalled"
    vmoe_plugins.unregister_plugin("aux_free")
    try:
        assert "aux_free" not in vr.available_routers()
        with pytest.raises(ValueError) as error:
            vr.get_router("aux_free", num_experts=E)
        assert str(error.value).startswith(
            "router 'aux_free' comes with the plugin package vmoe-router-aux-free, which is not "
            "installed: pip install vmoe-router-aux-free; installed: ["
        )
    finally:
        vmoe_plugins.reset()  # the entry points load again on the next lookup
    assert "aux_free" in vr.available_routers()


@pytest.mark.parametrize(
    "options",
    [
        {"k": 2, "capacity_factor": 0.75},  # drops, in token order
        {"k": 2, "capacity_factor": 0.75, "normalize_weights": True, "priority_score": "max"},
        {"k": 1, "capacity_factor": 2.0, "priority_score": "sum"},  # nothing dropped
    ],
    ids=["token-order", "bpr-normalized", "k1-no-drops"],
)
def test_outputs_and_gradients_equal_the_token_loop_reference(options):
    router = AuxFreeRouter(num_experts=E, **options)
    x_gsd, params, w_edd, bias = _inputs(1)
    state = {"bias": bias}
    kept = _reference_choices(
        params["gate"], bias, x_gsd, router.k, router.capacity(S), router.priority_score
    )
    gates = np.asarray(jax.nn.softmax(x_gsd @ params["gate"], axis=-1))
    chosen = [[_top(gates[g, s] + bias, router.k) for s in range(S)] for g in range(G)]
    unbiased = [[_top(gates[g, s], router.k) for s in range(S)] for g in range(G)]
    assert chosen != unbiased  # the bias does change the selection here

    def fast(params, w_edd, x_gsd):
        return _moe(router(params, x_gsd, state=state), w_edd, x_gsd)

    def slow(params, w_edd, x_gsd):
        return _moe_by_token_loop(params, w_edd, x_gsd, kept, router.normalize_weights, chosen)

    np.testing.assert_allclose(fast(params, w_edd, x_gsd), slow(params, w_edd, x_gsd), atol=1e-6)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
    got = jax.grad(loss(fast), argnums=(0, 1, 2))(params, w_edd, x_gsd)
    want = jax.grad(loss(slow), argnums=(0, 1, 2))(params, w_edd, x_gsd)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_no_gradient_reaches_the_bias():
    router = AuxFreeRouter(num_experts=E, k=2)
    x_gsd, params, w_edd, bias = _inputs(2)

    def loss(bias, params):
        routing = router(params, x_gsd, state={"bias": bias})
        new = router.update_state({"bias": bias}, routing.metrics)["bias"]
        return jnp.sum(_moe(routing, w_edd, x_gsd) ** 2) + jnp.sum(new)

    bias_grad, params_grad = jax.grad(loss, argnums=(0, 1))(bias, params)
    np.testing.assert_array_equal(bias_grad, np.zeros(E))
    assert float(jnp.abs(params_grad["gate"]).max()) > 0  # the gate still learns


def test_the_bias_moves_the_selection_but_the_weight_is_the_chosen_experts_own_gate():
    # One token whose gates are [0.6, 0.3, 0.1] (gate = identity, x = log of the gates).
    x = jnp.log(jnp.asarray([0.6, 0.3, 0.1]))[None, None, :]
    params = {"gate": jnp.eye(3)}
    router = AuxFreeRouter(num_experts=3, k=1)
    unbiased = router(params, x, state=router.init_state(3))
    assert int(unbiased.expert[0, 0]) == 0
    np.testing.assert_allclose(unbiased.weight[0, 0], 0.6, rtol=1e-6)
    # Bias 0.5 on expert 1: 0.3 + 0.5 > 0.6 selects it, and its weight stays its gate, 0.3.
    pushed = router(params, x, state={"bias": jnp.asarray([0.0, 0.5, 0.0])})
    assert int(pushed.expert[0, 0]) == 1
    np.testing.assert_allclose(pushed.weight[0, 0], 0.3, rtol=1e-6)
    # K=2, normalised: experts 1 and 0 (scores 0.8, 0.6), weights 0.3 and 0.6 over their sum.
    both = router.replace(k=2, normalize_weights=True)(
        params, x, state={"bias": jnp.asarray([0.0, 0.5, 0.0])}
    )
    assert both.expert[0].tolist() == [1, 0]
    np.testing.assert_allclose(both.weight[0], [1 / 3, 2 / 3], rtol=1e-6)


@pytest.mark.parametrize(
    "rule, expected_step",
    [
        # mean load 1/4: above it -1, at it 0, below it +1 ("sign", DeepSeek-V3)
        ("sign", [-1.0, 0.0, 1.0, 1.0]),
        # (mean - load) / mean
        ("proportional", [-1.2, 0.0, 0.4, 0.8]),
    ],
)
def test_the_update_rule_by_hand(rule, expected_step):
    router = AuxFreeRouter(num_experts=4, bias_rate=0.1, bias_rule=rule)
    state = {"bias": jnp.asarray([0.1, 0.0, 0.0, -0.1])}
    load = jnp.asarray([0.55, 0.25, 0.15, 0.05])
    new = router.update_state(state, {"expert_load": load, "dropped_fraction": jnp.float32(0)})
    expected = np.asarray([0.1, 0.0, 0.0, -0.1]) + 0.1 * np.asarray(expected_step)
    np.testing.assert_allclose(new["bias"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bias_step(load, rule), expected_step, rtol=1e-6, atol=1e-7)


def test_the_sign_rule_counts_float_rounding_of_the_mean_load_as_balanced():
    near = jnp.asarray([0.25 * (1 + BALANCED_RTOL / 2), 0.25, 0.25, 0.25 * (1 - BALANCED_RTOL / 2)])
    np.testing.assert_array_equal(bias_step(near, "sign"), np.zeros(4))


def test_a_skewed_gate_is_balanced_by_the_bias_without_any_aux_loss():
    """Most tokens' top gate is expert 0; training steps on fresh batches (route, then update
    the state from the step's metrics, as `vmoe_layers.MoeLayer` does; no optimizer, the gate
    stays as it is) move the bias until the load's coefficient of variation (std / mean over
    experts) is a fraction of what it was: near the sampling noise of 192 tokens a step."""
    router = AuxFreeRouter(num_experts=E, k=1, capacity_factor=2.0, bias_rate=0.02)
    params = router.init(jax.random.key(1), D)
    params = {"gate": params["gate"].at[0, 0].add(2.0)}  # x[..., 0] votes for expert 0

    @jax.jit
    def step(state, i):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(2), i), (32, S, D))
        routing = router(params, x.at[..., 0].add(1.0), state=state)
        return router.update_state(state, routing.metrics), routing

    def cv(load):
        return float(jnp.std(load) / jnp.mean(load))

    state, cvs = router.init_state(D), []
    for i in range(80):
        state, routing = step(state, i)
        assert float(routing.aux_loss) == 0.0 and routing.aux_losses == {}
        cvs.append(cv(routing.metrics["expert_load"]))
    assert cvs[0] > 0.9, cvs[0]  # most tokens on expert 0 at the start (1.05)
    assert np.mean(cvs[-20:]) < 0.35 * cvs[0], cvs  # 0.22
    bias = state["bias"]
    assert float(bias[0]) < 0 and float(jnp.min(bias[1:])) > float(bias[0])


def test_routing_without_state_says_where_it_comes_from():
    router = AuxFreeRouter(num_experts=E)
    params = router.init(jax.random.key(0), D)
    with pytest.raises(ValueError, match=r"needs state=\{'bias': \[E=4\]\}.*init_state"):
        router(params, jnp.ones((G, S, D)))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"load_loss_weight": 0.01}, "load_loss_weight=0.01 is not available"),
        ({"bias_rule": "linear"}, r"bias_rule='linear' must be one of \('sign', 'proportional'\)"),
        ({"bias_rate": -0.1}, "bias_rate=-0.1"),
        ({"priority_score": "min"}, "priority_score='min' must be one of"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        AuxFreeRouter(num_experts=E, **options)


def test_defaults_follow_deepseek_v3():
    router = AuxFreeRouter(num_experts=E)
    assert (router.bias_rate, router.bias_rule, router.noise_std) == (0.001, "sign", 0.0)
    assert router.importance_loss_weight == router.load_loss_weight == 0.0
    assert router.priority_score is None and router.normalize_weights is False
