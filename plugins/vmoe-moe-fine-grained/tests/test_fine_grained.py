"""Fine-grained expert segmentation: E experts of width H with K choices become E*m experts of
width H/m with K*m choices, the capacity factor kept.

Shape legend: G groups, S tokens per group, D model dim, E coarse experts, H their width, m the
granularity, K coarse choices per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_layers as vl
import vmoe_plugins
import vmoe_routing as vr
from vmoe_layers.strategy_check import run_strategy_check
from vmoe_moe_fine_grained import FineGrained

G, S, D, E, H, M = 2, 6, 5, 4, 8, 2


def _fine(router="top_k", m=M, **options):
    return vl.MoeLayer(
        E,
        H,
        router=router,
        router_options=options,
        group_size=S,
        variants={"fine_grained": {"m": m}},
    )


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (G, S, D))


def _mlp(p, e, x_d):
    """Expert e of an `mlp` stack on one token: Dense -> GELU (tanh approximation) -> Dense."""
    return jax.nn.gelu(x_d @ p["w_in"][e] + p["b_in"][e]) @ p["w_out"][e] + p["b_out"][e]


def _top(scores, k):
    """The k largest scores' indices, best first (ties: the lower index, as jax.lax.top_k)."""
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:k]]


def test_registered_through_its_entry_point():
    assert "fine_grained" in vl.available_variants()
    assert vl.VARIANTS.provider("fine_grained").startswith(
        'fine_grained (entry point "fine_grained = vmoe_moe_fine_grained.plugin" from '
        "vmoe-moe-fine-grained"
    )
    assert vl.get_variant("fine_grained", m=4) == FineGrained(m=4)


def test_a_fine_layer_has_e_times_m_experts_of_width_h_over_m_and_k_times_m_choices():
    layer = _fine(m=4, k=2, capacity_factor=1.0)
    shape = layer.layer_shape()
    assert (shape.num_experts, shape.mlp_dim, shape.router_options["k"]) == (16, 2, 8)
    assert shape.router_options["capacity_factor"] == 1.0  # kept
    params = layer.init(jax.random.key(1), _x())["params"]
    assert jax.tree.map(lambda a: a.shape, params) == {
        "experts": {"w_in": (16, D, 2), "b_in": (16, 2), "w_out": (16, 2, D), "b_out": (16, D)},
        "router": {"gate": (D, 16)},
    }
    router = layer.make_router()
    assert (router.num_experts, router.k, router.capacity_factor) == (16, 8, 1.0)
    assert layer.apply({"params": params}, _x()).metrics["expert_load"].shape == (16,)
    # m=1 changes nothing; the layer's default K (2) is the one multiplied.
    plain = vl.MoeLayer(E, H)
    assert plain.clone(variants={"fine_grained": {"m": 1}}).layer_shape() == plain.layer_shape()
    assert vl.MoeLayer(E, H, variants={"fine_grained": {"m": 2}}).make_router().k == 4


@pytest.mark.parametrize(
    "router, options",
    [
        ("top_k", {"k": 2, "capacity_factor": 0.75}),
        ("bpr", {"k": 2, "capacity_factor": 0.75, "normalize_weights": True}),
    ],
    ids=["top_k-raw-weights", "bpr-normalized"],
)
def test_outputs_and_gradients_equal_the_token_loop_reference(router, options):
    """Routing with K*m = 4 of E*m = 8 fine experts under a capacity that drops, found one token
    at a time in numpy: each token's choices are its top-4 softmax gates; buffers of
    C = ceil(4 * 0.75 * S / 8) = 3 slots are filled K-major, in token order (top_k) or by
    descending top-1 gate (bpr). A token's output is the sum over its kept fine experts e of
    w_e * MLP_e(x), w_e its gate (over the chosen gates' sum when normalised)."""
    layer = _fine(router, **options)  # evaluation: no gating noise
    fine_k, fine_e = 2 * M, E * M
    capacity = layer.make_router().capacity(S)
    assert capacity == 3
    x_gsd = _x(1)
    params = jax.jit(layer.init)(jax.random.key(2), x_gsd)["params"]

    gates = np.asarray(jax.nn.softmax(x_gsd @ params["router"]["gate"], axis=-1))
    chosen = [[_top(gates[g, s], fine_k) for s in range(S)] for g in range(G)]
    kept = []
    for g in range(G):
        order = list(range(S)) if router == "top_k" else _top(gates[g].max(-1), S)
        count = [0] * fine_e
        for j in range(fine_k):
            for s in order:
                e = chosen[g][s][j]
                if count[e] < capacity:
                    kept.append((g, s, e))
                count[e] += 1
    assert len(kept) < G * S * fine_k  # some choices are dropped

    def fast(params, x_gsd):
        return layer.apply({"params": params}, x_gsd).output

    def slow(params, x_gsd):
        rows = []
        for g in range(G):
            row = []
            for s in range(S):
                p = jax.nn.softmax(x_gsd[g, s] @ params["router"]["gate"])
                total = sum(p[e] for e in chosen[g][s]) if options.get("normalize_weights") else 1
                y = jnp.zeros(D)
                for e in (e for g_, s_, e in kept if (g_, s_) == (g, s)):
                    y = y + p[e] / total * _mlp(params["experts"], e, x_gsd[g, s])
                row.append(y)
            rows.append(jnp.stack(row))
        return jnp.stack(rows)

    np.testing.assert_allclose(fast(params, x_gsd), slow(params, x_gsd), rtol=1e-5, atol=1e-6)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
    got = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(params, x_gsd)
    want = jax.grad(loss(slow), argnums=(0, 1))(params, x_gsd)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _segment(coarse_params, m):
    """Fine params holding the coarse layer's computation. An MLP of width H is the sum of m
    MLPs of width H/m on column slices of w_in, b_in and row slices of w_out, b_out counted
    once. Fine expert e*m + j gets slice j of coarse expert e, its w_out rows times m and the
    whole b_out: under a combine weight of p/m it adds p/m (m h_j W_j + b_out), and the m
    segments together p (h W + b_out). Gate column e*m + j is coarse column e."""
    p = coarse_params["experts"]
    e, d, h = p["w_in"].shape
    w_in = p["w_in"].reshape(e, d, m, h // m).transpose(0, 2, 1, 3).reshape(e * m, d, h // m)
    experts = {
        "w_in": w_in,
        "b_in": p["b_in"].reshape(e * m, h // m),
        "w_out": m * p["w_out"].reshape(e * m, h // m, d),
        "b_out": jnp.repeat(p["b_out"], m, axis=0),
    }
    return {
        "experts": experts,
        "router": {"gate": jnp.repeat(coarse_params["router"]["gate"], m, 1)},
    }


@pytest.mark.parametrize("m", [2, 4])
def test_segmented_coarse_experts_under_a_repeated_gate_reproduce_the_coarse_layer(m):
    """A fine layer made from a coarse one by hand equals it, drops included: the real top_k
    router (K=2 -> 2m, raw softmax weights) under a capacity factor that drops.

    Each gate column is repeated m times, so the m segments of coarse expert e share its logit:
    softmax gives each p_e / m, and top-(K*m) picks exactly the m segments of each of the
    token's coarse top-K, in order (ties go to the lower index). Each segment holds a slice of
    e's weights scaled to undo the 1/m (`_segment`), so the m of them return p_e MLP_e(x). The
    capacity is the same number (ceil(K*m S c / (E*m)) = ceil(K S c / E)), and fine expert
    e*m + j sees coarse expert e's choices in the same K-major order, so it keeps and drops the
    same tokens. Inputs and gate are multiples of 1/4 and 1/8, so the logits are exact and the
    m copies tie exactly (whatever the matmul's summation order)."""
    options = {"k": 2, "capacity_factor": 0.5}
    coarse = vl.MoeLayer(E, H, router_options=options, group_size=S)
    fine = coarse.clone(variants={"fine_grained": {"m": m}})
    x_gsd = jnp.round(4 * _x(3)) / 4
    coarse_params = coarse.init(jax.random.key(4), x_gsd)["params"]
    gate = jnp.round(8 * coarse_params["router"]["gate"]) / 8
    coarse_params = {**coarse_params, "router": {"gate": gate}}
    fine_params = _segment(coarse_params, m)
    assert jax.tree.map(jnp.shape, fine_params) == jax.tree.map(
        jnp.shape, fine.init(jax.random.key(4), x_gsd)["params"]
    )

    want = coarse.apply({"params": coarse_params}, x_gsd)
    got = fine.apply({"params": fine_params}, x_gsd)
    assert float(want.metrics["dropped_fraction"]) > 0  # the capacity does drop
    np.testing.assert_allclose(got.metrics["dropped_fraction"], want.metrics["dropped_fraction"])
    np.testing.assert_allclose(got.output, want.output, rtol=1e-5, atol=1e-6)
    # The fine router's choices are the segments of the coarse ones, in order.
    coarse_experts = coarse.make_router().choose(coarse_params["router"], x_gsd)[0]
    fine_experts = fine.make_router().choose(fine_params["router"], x_gsd)[0]
    segments = coarse_experts[..., :, None] * m + jnp.arange(m)
    np.testing.assert_array_equal(fine_experts, segments.reshape(G, S, 2 * m))

    # And the gradient reaching the tokens (through the experts and the gate) is the same.
    def token_grad(layer, params):
        return jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(layer.apply(params, x).output))))

    np.testing.assert_allclose(
        token_grad(fine, {"params": fine_params})(x_gsd),
        token_grad(coarse, {"params": coarse_params})(x_gsd),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "group_size, options",
    [
        (10, {}),  # k=2, capacity_factor=1.05: C = ceil(5.25) = 6
        (10, {"capacity_multiple_of": 4}),  # 6 -> 8 slots in both
        (6, {"capacity_factor": 0.5, "capacity_rounding": "floor"}),  # floor(1.5) = 1
        (64, {"k": 1, "capacity_factor": 1.25, "capacity_multiple_of": 4}),  # 20
    ],
)
def test_flops_routed_and_buffers_equal_the_coarse_layer_the_gate_is_m_times(group_size, options):
    """Per token: one fine expert 4 D H/m, the gate 2 D E m; K*m x 4DH/m = K x 4DH routed; the
    capacity is the coarse C whatever the rounding, so E*m*C slots of 4DH/m cost what E*C
    slots of 4DH do (m times the slots); the whole layer differs by the gate only."""
    d, h, m, s = 16, 32, 4, group_size
    coarse = vl.MoeLayer(E, h, router_options=options)
    fine = coarse.clone(variants={"fine_grained": {"m": m}})
    c, f = vl.layer_flops(coarse, d, s), vl.layer_flops(fine, d, s)
    assert f.routed == c.routed == c.k * 4 * d * h
    assert (f.expert, f.router, f.k) == (4 * d * h // m, 2 * d * E * m, c.k * m)
    k, factor = options.get("k", 2), options.get("capacity_factor", 1.05)
    coarse_capacity = vr.compute_capacity(
        s,
        E,
        k,
        factor,
        rounding=options.get("capacity_rounding", "ceil"),
        multiple_of=options.get("capacity_multiple_of", 1),
    )
    assert f.capacity == c.capacity == coarse_capacity
    assert f.buffers == c.buffers == E * coarse_capacity * 4 * d * h / s
    assert f.total - c.total == pytest.approx(2 * d * E * (m - 1))
    assert f.total == pytest.approx(f.router + f.buffers)


# A further case (nox -s tests-extended): what the strategies meet here is a layer of E*m
# experts, which vmoe-layers' 8-device tests cover; the default run checks a variant under every
# strategy once, with the shared-experts plugin (its branch params are the new layout).
@pytest.mark.extended
def test_eight_devices_data_expert_fsdp_and_expert_fsdp_equal_one_device():
    """vmoe-layers' `python -m vmoe_layers.strategy_check` on 8 host devices: E=4 experts, m=2
    -> 8 fine experts, 2 per device on the expert axis (E*m must be divisible by its size, 4
    here); loss and gradients of one training step vs one device."""
    report = run_strategy_check({"num_experts": 4, "variants": {"fine_grained": {"m": 2}}})
    assert set(report) == {"data", "expert", "fsdp", "expert_fsdp"}
    for name, case in report.items():
        assert case["loss"] == pytest.approx(case["reference_loss"], rel=1e-5), name
        assert case["grad_max_rel_diff"] < 1e-4, (name, case)
        assert case["init_sharded"] == {"values_match": True, "layout_ok": True}, name
        # E*m = 8 experts of [D, H/m] = [16, 16]: 2 per device on the expert axis.
        shard = case["shard_shapes"]["experts/w_in"]
        assert shard[0] == (2 if name.startswith("expert") else 8), (name, case)
        if not name.endswith("fsdp"):
            assert shard[1:] == [16, 16], (name, case)


def test_without_the_plugin_the_error_names_the_package_to_install():
    assert vl.PLUGIN_VARIANTS["fine_grained"] == "vmoe-moe-fine-grained"
    vl.available_variants()  # load the entry points, then take this one away: "uninstalled"
    vmoe_plugins.unregister_plugin("fine_grained")
    try:
        assert "fine_grained" not in vl.available_variants()
        with pytest.raises(ValueError) as error:
            vl.MoeLayer(E, H, variants={"fine_grained": {"m": 2}}).layer_shape()
        assert str(error.value).startswith(
            "MoE layer variant 'fine_grained' comes with the plugin package "
            "vmoe-moe-fine-grained, which is not installed: pip install vmoe-moe-fine-grained; "
            "installed: ["
        )
    finally:
        vmoe_plugins.reset()  # the entry points load again on the next lookup
    assert "fine_grained" in vl.available_variants()


@pytest.mark.parametrize(
    "m, message",
    [
        (0, "fine_grained: m=0 must be an integer >= 1"),
        (True, "fine_grained: m=True must be an integer >= 1"),
        (1.5, "fine_grained: m=1.5 must be an integer >= 1"),
        ("2", "fine_grained: m='2' must be an integer >= 1"),
        (
            3,
            "fine_grained: m=3 must divide the experts' hidden width mlp_dim H=8 (each of the m "
            "segments holds H/m units); allowed: one of [1, 2, 4, 8]",
        ),
    ],
)
def test_bad_granularities_are_refused_with_the_value_and_what_is_allowed(m, message):
    with pytest.raises(ValueError) as error:
        vl.MoeLayer(E, H, variants={"fine_grained": {"m": m}}).layer_shape()
    assert str(error.value) == message
    with pytest.raises(ValueError, match=r"missing required option\(s\) \['m'\]"):
        vl.get_variant("fine_grained")


def test_a_router_without_k_is_refused():
    with pytest.raises(ValueError, match=r"have no 'k' to multiply by m=2\. Routers without a K"):
        _fine("soft").layer_shape()
    with pytest.raises(ValueError, match=r"router option k=0 must be an integer >= 1"):
        _fine(k=0).layer_shape()


def test_a_router_object_gets_k_times_m_from_router_options():
    """A router object is used as built: the variant needs its coarse K in router_options and
    the object E*m experts."""
    router = vr.BprRouter(num_experts=E * M, k=1)
    layer = vl.MoeLayer(E, H, router=router, variants={"fine_grained": {"m": M}})
    with pytest.raises(ValueError, match=r"give its coarse K as router_options=\{'k': K\}"):
        layer.make_router()
    layer = layer.clone(router_options={"k": 2})
    assert (layer.make_router().num_experts, layer.make_router().k) == (E * M, 2 * M)
    out = layer.apply(layer.init(jax.random.key(0), _x()), _x())
    assert out.output.shape == (G, S, D)
