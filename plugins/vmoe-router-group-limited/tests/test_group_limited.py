"""Group-limited top-K routing: each token picks its top-K experts among the experts of its best
`topk_groups` contiguous expert groups; the rest is top_k's (capacity, buffer order, losses).

Every routing here is checked against a slow, obvious reference written one token at a time in
NumPy, and through `vmoe_layers.MoeLayer` against a token-by-token loop of the whole layer.

Shape legend: G groups (of tokens), S tokens per group, D model dim, E experts, H expert MLP
width, K choices per token, P expert groups (`num_expert_groups`), T kept groups per token
(`topk_groups`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_layers as vl
import vmoe_plugins
import vmoe_routing as vr
from vmoe_router_group_limited import GroupLimitedRouter

G, S, D, H = 2, 12, 6, 8


def _inputs(num_experts, seed):
    kx, kg = jax.random.split(jax.random.key(seed))
    x_gsd = jax.random.normal(kx, (G, S, D))
    return x_gsd, {"gate": jax.random.normal(kg, (D, num_experts))}


def _top(scores, k):
    """The k indices of largest score, best first (ties: the lower index, as jax.lax.top_k)."""
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:k]]


def _reference_choices(gates_gse, router):
    """[G][S] lists of each token's K experts, best first, found one token at a time: score
    each group of E/P experts (the sum of its two largest gates, or its largest), keep the T
    best groups, take the K largest gates among their experts."""
    e, p, t = router.num_experts, router.num_expert_groups, router.topk_groups
    size = e // p
    choices = []
    for g in range(gates_gse.shape[0]):
        row = []
        for s in range(gates_gse.shape[1]):
            gate = gates_gse[g, s]
            scores = []
            for q in range(p):
                members = sorted(gate[q * size : (q + 1) * size], reverse=True)
                if router.group_score == "max" or len(members) == 1:
                    scores.append(members[0])
                else:
                    scores.append(members[0] + members[1])
            kept = _top(scores, t)
            allowed = [ex for q in kept for ex in range(q * size, (q + 1) * size)]
            masked = [gate[ex] if ex in allowed else -np.inf for ex in range(e)]
            chosen = _top(masked, router.k)
            assert all(ex in allowed for ex in chosen)
            row.append(chosen)
        choices.append(row)
    return choices


def _reference_routing(gates_gse, router, capacity):
    """(token, expert, slot, weight, valid) [G, N] as numpy arrays, in processing order: the
    buffers are filled K-major (every first choice before any second one), in token order or by
    descending priority (the max / sum of the token's chosen gates, ties in token order); a
    choice past the expert's capacity is dropped (slot = capacity, weight 0). Weights: the
    chosen gates, over their sum with `normalize_weights`."""
    gates_gse = np.asarray(gates_gse)
    choices = _reference_choices(gates_gse, router)
    out = {name: [] for name in ("token", "expert", "slot", "weight", "valid")}
    for g, row in enumerate(choices):
        chosen_gates = [gates_gse[g, s, row[s]] for s in range(len(row))]
        if router.priority_score is None:
            order = list(range(len(row)))
        elif router.priority_score == "max":
            order = _top([c.max() for c in chosen_gates], len(row))
        else:
            order = _top([c.sum() for c in chosen_gates], len(row))
        count = [0] * router.num_experts
        columns = {name: [] for name in out}
        for j in range(router.k):
            for s in order:
                e = row[s][j]
                weight = chosen_gates[s][j]
                if router.normalize_weights:
                    weight = weight / chosen_gates[s].sum()
                valid = count[e] < capacity
                columns["token"].append(s)
                columns["expert"].append(e)
                columns["slot"].append(count[e] if valid else capacity)
                columns["weight"].append(weight if valid else 0.0)
                columns["valid"].append(valid)
                count[e] += 1
        for name in out:
            out[name].append(columns[name])
    return {name: np.asarray(value) for name, value in out.items()}


def _expert_groups_span(choices, experts_per_unit):
    """The most units (groups, devices) of `experts_per_unit` contiguous experts that one
    token's choices ([G][S][K] lists) fall in."""
    return max(len({e // experts_per_unit for e in chosen}) for row in choices for chosen in row)


# (a) The routing decision equals the token-loop reference.

ROUTING_CASES = {
    # E=8 in 4 groups of 2, 2 kept, DeepSeek-V3's score, a capacity that drops, token order.
    "top2sum-vanilla": {
        "num_experts": 8,
        "k": 2,
        "num_expert_groups": 4,
        "topk_groups": 2,
        "capacity_factor": 1.0,
    },
    # One group kept, by its largest gate; BPR by the top chosen gate, weights normalised.
    "max-bpr-normalized": {
        "num_experts": 8,
        "k": 2,
        "num_expert_groups": 4,
        "topk_groups": 1,
        "group_score": "max",
        "capacity_factor": 0.5,
        "priority_score": "max",
        "normalize_weights": True,
    },
    # E=12 in 3 groups of 4, K=3 across 2 kept groups, BPR by the sum.
    "k3-bpr-sum": {
        "num_experts": 12,
        "k": 3,
        "num_expert_groups": 3,
        "topk_groups": 2,
        "capacity_factor": 0.75,
        "priority_score": "sum",
    },
    # E=16 in 8 groups of 2, K=4 in 3 kept groups; an evaluation capacity of its own.
    "k4-three-groups": {
        "num_experts": 16,
        "k": 4,
        "num_expert_groups": 8,
        "topk_groups": 3,
        "capacity_factor": 2.0,
        "eval_capacity_factor": 0.5,
    },
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", ROUTING_CASES)
def test_routing_equals_the_token_loop_reference(case, seed):
    router = GroupLimitedRouter(**ROUTING_CASES[case])
    x_gsd, params = _inputs(router.num_experts, seed)
    gates = np.asarray(router.gate(params, x_gsd)[2])
    routing = router(params, x_gsd)
    want = _reference_routing(gates, router, router.capacity(S))
    for name in ("token", "expert", "slot", "valid"):
        np.testing.assert_array_equal(getattr(routing, name), want[name], err_msg=name)
    np.testing.assert_allclose(routing.weight, want["weight"], rtol=1e-6, atol=1e-7)


def test_the_reference_cases_restrict_the_choice_and_drop():
    """The cases above are not plain top_k: for every seed the group limit changes some
    tokens' experts, and the capacity drops some choices."""
    for options in ROUTING_CASES.values():
        router = GroupLimitedRouter(**options)
        unrestricted = router.replace(topk_groups=router.num_expert_groups)
        for seed in (0, 1, 2):
            x_gsd, params = _inputs(router.num_experts, seed)
            gates = np.asarray(router.gate(params, x_gsd)[2])
            assert _reference_choices(gates, router) != _reference_choices(gates, unrestricted)
            assert not _reference_routing(gates, router, router.capacity(S))["valid"].all()


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_training_routes_the_noisy_gates_as_the_reference(group_score):
    router = GroupLimitedRouter(
        num_experts=8, k=2, num_expert_groups=2, topk_groups=1, group_score=group_score
    )
    x_gsd, params = _inputs(8, 3)
    rng = jax.random.key(7)
    _, _, noisy = router.gate(params, x_gsd, rng=rng, deterministic=False)
    routing = router(params, x_gsd, rng=rng, deterministic=False)
    want = _reference_routing(np.asarray(noisy), router, router.capacity(S, False))
    for name in ("token", "expert", "slot", "valid"):
        np.testing.assert_array_equal(getattr(routing, name), want[name], err_msg=name)
    np.testing.assert_allclose(routing.weight, want["weight"], rtol=1e-6, atol=1e-7)


def test_the_two_group_scores_can_keep_different_groups():
    # Gates [0.40, 0.05 | 0.30, 0.25]: by the largest gate group 0 wins, by the top-2 sum group 1.
    x = jnp.log(jnp.asarray([0.40, 0.05, 0.30, 0.25]))[None, None, :]
    params = {"gate": jnp.eye(4)}
    router = GroupLimitedRouter(num_experts=4, k=2, num_expert_groups=2, topk_groups=1)
    assert router(params, x).expert[0].tolist() == [2, 3]
    assert router.replace(group_score="max")(params, x).expert[0].tolist() == [0, 1]
    np.testing.assert_allclose(router(params, x).weight[0], [0.30, 0.25], rtol=1e-6)


def test_aux_losses_are_top_ks_on_the_unmasked_gates():
    router = GroupLimitedRouter(
        num_experts=8,
        k=2,
        num_expert_groups=4,
        topk_groups=1,
        importance_loss_weight=0.5,
        gshard_loss_weight=0.25,
        z_loss_weight=0.125,
    )
    x_gsd, params = _inputs(8, 4)
    routing = router(params, x_gsd)
    logits = vr.gate_logits(params["gate"], x_gsd)
    gates = jax.nn.softmax(logits, axis=-1)
    want = {
        "importance": vr.importance_loss(gates),
        "gshard": vr.gshard_loss(gates),
        "z": vr.z_loss(logits),
    }
    assert set(routing.aux_losses) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(routing.aux_losses[name], value, rtol=1e-6, err_msg=name)
    total = 0.5 * want["importance"] + 0.25 * want["gshard"] + 0.125 * want["z"]
    np.testing.assert_allclose(routing.aux_loss, total, rtol=1e-6)


def test_gradients_reach_the_gate_through_the_weights_only():
    router = GroupLimitedRouter(num_experts=8, k=2, num_expert_groups=4, topk_groups=1)
    x_gsd, params = _inputs(8, 5)

    def loss(params):
        return jnp.sum(router(params, x_gsd).weight ** 2)

    def reference(params):
        gates = jax.nn.softmax(x_gsd @ params["gate"], axis=-1)
        expert_gsk = router.choose(params, x_gsd)[0]  # fixed: a piecewise-constant choice
        routing = router(params, x_gsd)
        chosen = jnp.take_along_axis(gates, expert_gsk, axis=-1)  # [G, S, K]
        kept_gsk = routing.valid.reshape(G, router.k, S).transpose(0, 2, 1)
        return jnp.sum(jnp.where(kept_gsk, chosen, 0.0) ** 2)

    got, want = jax.grad(loss)(params), jax.grad(reference)(params)
    np.testing.assert_allclose(got["gate"], want["gate"], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(got["gate"]).max()) > 0


# (b) Through MoeLayer: outputs and gradients equal a token-by-token loop of the layer.


def _mlp_expert(p, e, x_d):
    """Expert e of MoeLayer's `mlp` experts on one token: Dense -> GELU (tanh) -> Dense."""
    h = jax.nn.gelu(x_d @ p["w_in"][e] + p["b_in"][e])
    return h @ p["w_out"][e] + p["b_out"][e]


LAYER_CASES = {
    "top2sum-vanilla": {
        "k": 2,
        "num_expert_groups": 4,
        "topk_groups": 2,
        "capacity_factor": 0.75,
    },
    "max-bpr-normalized": {
        "k": 2,
        "num_expert_groups": 2,
        "topk_groups": 1,
        "group_score": "max",
        "capacity_factor": 0.75,
        "priority_score": "max",
        "normalize_weights": True,
    },
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_outputs_and_gradients_equal_the_token_loop_reference(case):
    """y[g, s] = sum over token (g, s)'s kept experts e of w_e * MLP_e(x[g, s]), w_e its softmax
    gate (over the sum of its K chosen gates when normalised); the chosen and kept experts come
    from the NumPy reference, the weights are traced so gradients reach the gate and x."""
    options = LAYER_CASES[case]
    e = 8
    layer = vl.MoeLayer(e, H, router="group_limited", router_options=options, group_size=S)
    router = layer.make_router()
    assert isinstance(router, GroupLimitedRouter)
    x_gsd = jax.random.normal(jax.random.key(10), (G, S, D))
    params = jax.jit(layer.init)(jax.random.key(11), x_gsd)["params"]
    # Random expert biases (they start at 0) and a sharper gate, so every term matters.
    keys = iter(jax.random.split(jax.random.key(12), 3))
    experts = dict(params["experts"])
    for name in ("b_in", "b_out"):
        experts[name] = 0.1 * jax.random.normal(next(keys), experts[name].shape)
    gate = 3.0 * params["router"]["gate"]
    params = {"router": {"gate": gate}, "experts": experts}

    gates = np.asarray(router.gate(params["router"], x_gsd)[2])
    chosen = _reference_choices(gates, router)
    want = _reference_routing(gates, router, router.capacity(S))
    kept = {(g, s): [] for g in range(G) for s in range(S)}  # each token's kept experts
    for g in range(G):
        for s, ex, valid in zip(want["token"][g], want["expert"][g], want["valid"][g], strict=True):
            if valid:
                kept[(g, int(s))].append(int(ex))
    assert not want["valid"].all()  # some choices are dropped
    unrestricted = router.replace(topk_groups=router.num_expert_groups)
    assert chosen != _reference_choices(gates, unrestricted)  # the limit changes some choices

    def fast(params, x_gsd):
        return layer.apply({"params": params}, x_gsd).output

    def slow(params, x_gsd):
        rows = []
        for g in range(G):
            row = []
            for s in range(S):
                p = jax.nn.softmax(x_gsd[g, s] @ params["router"]["gate"])
                total = sum(p[ex] for ex in chosen[g][s]) if router.normalize_weights else 1.0
                y = jnp.zeros(D)
                for ex in kept[(g, s)]:
                    y = y + p[ex] / total * _mlp_expert(params["experts"], ex, x_gsd[g, s])
                row.append(y)
            rows.append(jnp.stack(row))
        return jnp.stack(rows)

    np.testing.assert_allclose(fast(params, x_gsd), slow(params, x_gsd), rtol=1e-5, atol=1e-6)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
    got = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(params, x_gsd)
    want_grads = jax.grad(loss(slow), argnums=(0, 1))(params, x_gsd)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(got[0]["router"]["gate"]).max()) > 0


# (c) Where a token's experts lie.


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_with_one_kept_group_every_tokens_experts_lie_in_one_group(group_score):
    router = GroupLimitedRouter(
        num_experts=16, k=4, num_expert_groups=4, topk_groups=1, group_score=group_score
    )
    for seed in range(3):
        x_gsd, params = _inputs(16, seed)
        expert_gsk = np.asarray(router.choose(params, x_gsd)[0])
        group_gsk = expert_gsk // 4
        assert (group_gsk == group_gsk[..., :1]).all()
    # top_k spreads the same tokens over several groups.
    top_k = np.asarray(vr.TopKRouter(num_experts=16, k=4).choose(params, x_gsd)[0])
    assert _expert_groups_span(top_k.tolist(), 4) > 1


def test_the_expert_strategy_splits_the_experts_in_contiguous_blocks():
    """The premise of the device bound: the expert strategy shards the experts' leading axis
    over its 'expert' mesh axis (jax shards an axis in equal contiguous blocks, in mesh order),
    so on n expert shards device i holds experts i*E/n ... (i+1)*E/n - 1."""
    strategy = vl.get_strategy("expert", mesh_shape=(1, 1))
    layer = vl.MoeLayer(8, H, router="group_limited", group_size=S)
    params = layer.init(jax.random.key(0), jnp.ones((G, S, D)))["params"]
    specs = strategy.param_specs({"moe": params})["moe"]["experts"]
    assert all(spec[0] == "expert" for spec in specs.values()), specs


# The 'expert' axis of the 8-device meshes (data, expert) = (1, 8), (2, 4), (4, 2).
EXPERT_SHARDS = (8, 4, 2)


@pytest.mark.parametrize("groups_per_shard", [1, 2])
@pytest.mark.parametrize("shards", EXPERT_SHARDS)
def test_with_a_group_per_expert_shard_a_tokens_experts_lie_on_at_most_topk_groups_devices(
    shards, groups_per_shard
):
    e = 16
    p = shards * groups_per_shard
    for t in sorted({1, 2, p // 2}):
        k = min(4, t * e // p)
        router = GroupLimitedRouter(num_experts=e, k=k, num_expert_groups=p, topk_groups=t)
        x_gsd, params = _inputs(e, t)
        expert_gsk = np.asarray(router.choose(params, x_gsd)[0])
        # The device of expert e is e // (E / n): count the devices of each token's experts.
        span = _expert_groups_span(expert_gsk.tolist(), e // shards)
        assert span <= t, (shards, p, t, k, span)
        if min(k, shards) > t:  # the bound bites: top_k reaches more devices
            top_k = np.asarray(vr.TopKRouter(num_experts=e, k=k).choose(params, x_gsd)[0])
            assert _expert_groups_span(top_k.tolist(), e // shards) > t


# (d) One group, every group kept, or groups of one expert (the top-T groups are then the
# top-T experts, and K <= T) is plain top_k.


@pytest.mark.parametrize(
    "groups, priority_score",
    [((1, 1), None), ((4, 4), None), ((8, 2), None), ((1, 1), "max"), ((2, 2), "sum")],
    ids=["one-group", "all-kept", "one-expert-groups", "one-group-bpr-max", "all-kept-bpr-sum"],
)
@pytest.mark.parametrize("deterministic", [True, False])
def test_without_a_left_out_group_the_routing_is_top_ks(groups, priority_score, deterministic):
    p, t = groups
    load = 0.005 if t == p else 0.0  # the load loss is allowed when no group is left out
    common = {
        "num_experts": 8,
        "k": 2,
        "capacity_factor": 0.75,
        "normalize_weights": priority_score is not None,
        "load_loss_weight": load,
        "gshard_loss_weight": 0.01,
        "z_loss_weight": 0.001,
    }
    router = GroupLimitedRouter(
        num_expert_groups=p, topk_groups=t, priority_score=priority_score, **common
    )
    if priority_score is None:
        top_k = vr.TopKRouter(**common)
    else:
        top_k = vr.BprRouter(priority_score=priority_score, **common)
    x_gsd, params = _inputs(8, 6)
    rng = jax.random.key(3)
    got = router(params, x_gsd, rng=rng, deterministic=deterministic)
    want = top_k(params, x_gsd, rng=rng, deterministic=deterministic)
    assert set(got.aux_losses) == {"importance", "gshard", "z"} | ({"load"} if load else set())
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_in_a_layer_one_group_equals_top_k_with_the_same_params():
    """Same params as top_k ({"gate": [D, E]}): a model trained with it runs with top_k."""
    options = {"k": 2, "capacity_factor": 0.75}
    grouped = vl.MoeLayer(8, H, router="group_limited", router_options=options, group_size=S)
    plain = vl.MoeLayer(8, H, router="top_k", router_options=options, group_size=S)
    x_gsd = jax.random.normal(jax.random.key(20), (G, S, D))
    variables = grouped.init(jax.random.key(21), x_gsd)
    assert jax.tree.structure(variables) == jax.tree.structure(
        plain.init(jax.random.key(21), x_gsd)
    )
    np.testing.assert_array_equal(
        grouped.apply(variables, x_gsd).output, plain.apply(variables, x_gsd).output
    )


# (e) Bad options are refused, naming the value and what is allowed.


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"num_expert_groups": 3},
            r"num_expert_groups=3 must divide num_experts=8 \(groups of equal size\); "
            r"allowed: one of \[1, 2, 4, 8\]",
        ),
        ({"num_expert_groups": 0}, r"num_expert_groups=0 must be an integer >= 1"),
        ({"num_expert_groups": 2.0}, r"num_expert_groups=2.0 must be an integer"),
        (
            {"num_expert_groups": 4, "topk_groups": 5},
            r"topk_groups=5 must be an integer in \[1, num_expert_groups=4\]",
        ),
        ({"num_expert_groups": 4, "topk_groups": 0}, r"topk_groups=0 must be an integer in"),
        ({"num_expert_groups": 4, "topk_groups": True}, r"topk_groups=True must be an integer"),
        (
            {"num_expert_groups": 4, "topk_groups": 1, "k": 3},
            r"k=3 must be <= topk_groups \* experts per group = 1 \* 2 = 2 \(num_experts=8, "
            r"num_expert_groups=4\)",
        ),
        (
            {"group_score": "sum"},
            r"group_score='sum' must be one of \('top2_sum', 'max'\)",
        ),
        ({"priority_score": "min"}, r"priority_score='min' must be one of \(None, 'max', 'sum'\)"),
        (
            {"num_expert_groups": 4, "topk_groups": 2, "load_loss_weight": 0.01},
            r"load_loss_weight=0.01 is not available with router 'group_limited' when "
            r"topk_groups=2 < num_expert_groups=4: .*allowed: 0",
        ),
    ],
)
def test_bad_options_are_named(options, message):
    options = {"num_experts": 8, "k": 1, **options}
    with pytest.raises(ValueError, match=message):
        GroupLimitedRouter(**options)


def test_bad_options_are_named_through_the_registry_and_the_layer():
    with pytest.raises(ValueError, match="num_expert_groups=3 must divide num_experts=8"):
        vr.get_router("group_limited", num_experts=8, num_expert_groups=3)
    layer = vl.MoeLayer(
        8, H, router="group_limited", router_options={"group_score": "mean"}, group_size=S
    )
    with pytest.raises(ValueError, match="group_score='mean' must be one of"):
        layer.init(jax.random.key(0), jnp.ones((G, S, D)))


def test_defaults():
    router = GroupLimitedRouter(num_experts=8)
    assert (router.num_expert_groups, router.topk_groups, router.group_score) == (1, 1, "top2_sum")
    assert router.priority_score is None and router.load_loss_weight == 0.0
    assert (router.noise_std, router.importance_loss_weight) == (1.0, 0.005)  # top_k's
    assert router.replace(num_expert_groups=4, topk_groups=2, k=2) == GroupLimitedRouter(
        num_experts=8, k=2, num_expert_groups=4, topk_groups=2
    )


# (f) Registered through its entry point; uninstalled, the name says what to install.


def test_registered_through_its_entry_point():
    assert "group_limited" in vr.available_routers()
    assert vr.ROUTERS.provider("group_limited").startswith(
        'group_limited (entry point "group_limited = vmoe_router_group_limited.plugin" from '
        "vmoe-router-group-limited"
    )
    router = vr.get_router("group_limited", num_experts=8, k=2, num_expert_groups=4)
    assert isinstance(router, GroupLimitedRouter) and not vr.has_state(router)


def test_without_the_plugin_the_error_names_the_package_to_install():
    assert vr.PLUGIN_ROUTERS["group_limited"] == "vmoe-router-group-limited"
    vr.available_routers()  # load the entry points, then take this one away: "uninstalled"
    vmoe_plugins.unregister_plugin("group_limited")
    expected = (
        "router 'group_limited' comes with the plugin package vmoe-router-group-limited, which "
        "is not installed: pip install vmoe-router-group-limited; installed: ["
    )
    try:
        assert "group_limited" not in vr.available_routers()
        assert "group_limited" not in vr.ROUTERS.names()
        with pytest.raises(ValueError) as error:
            vr.get_router("group_limited", num_experts=8)
        assert str(error.value).startswith(expected)
        layer = vl.MoeLayer(8, H, router="group_limited", group_size=S)
        with pytest.raises(ValueError) as error:
            layer.init(jax.random.key(0), jnp.ones((G, S, D)))
        assert str(error.value).startswith(expected)
    finally:
        vmoe_plugins.reset()  # the entry points load again on the next lookup
    assert "group_limited" in vr.available_routers()
