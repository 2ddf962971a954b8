"""Shared experts: a MoE layer variant (a branch) adding N experts every token goes through.

The layer with shared experts equals a slow per-token loop (routed experts chosen by hand from
the gates, plus every shared expert); its FLOP report counts N x 4DH per token for the branch;
its params are dense and laid out as such, and 8 devices under every built-in sharding
strategy give one device's loss and gradients (a subprocess:
`python -m vmoe_layers.strategy_check`).

Shape legend: G groups, S tokens per group, D model dim, E routed experts, H hidden width,
K choices per token, N shared experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import vmoe_layers as vl
import vmoe_moe_shared_experts.plugin
import vmoe_plugins
from vmoe_layers.experts import ParamSpec, init_stacked
from vmoe_layers.strategy_check import run_strategy_check
from vmoe_moe_shared_experts import SharedExperts, stacked_spec

G, S, D, E, H, K = 2, 6, 5, 4, 8, 2


def _mlp(p, i, x_d):
    """Expert i of an `mlp` stack on one token: Dense -> GELU (tanh approx.) -> Dense."""
    h = jax.nn.gelu(x_d @ p["w_in"][i] + p["b_in"][i])
    return h @ p["w_out"][i] + p["b_out"][i]


def _glu(p, i, x_d):
    """Expert i of a `glu` stack on one token: (silu(x Wg) * (x Wu)) Wo."""
    return (jax.nn.silu(x_d @ p["w_gate"][i]) * (x_d @ p["w_up"][i])) @ p["w_out"][i]


def _top(scores_e, k):
    """The k experts of largest score, best first (ties: the lower index, as jax.lax.top_k)."""
    return [int(e) for e in np.argsort(-np.asarray(scores_e), kind="stable")[:k]]


def _kept_by_hand(gates_gse, k, capacity):
    """{(g, s): [kept experts]}: each token's top-K gates, buffers filled K-major (every
    token's first choice, then every token's second) in token order, `capacity` slots each."""
    kept = {(g, s): [] for g in range(G) for s in range(S)}
    for g in range(G):
        chosen = [_top(gates_gse[g, s], k) for s in range(S)]
        count = [0] * E
        for j in range(k):
            for s in range(S):
                e = chosen[s][j]
                if count[e] < capacity:
                    kept[(g, s)].append(e)
                count[e] += 1
    return kept


def _kept_by_router(router, router_params, x_gsd):
    """The same, read off the layer's router's decision."""
    routing = router(router_params, x_gsd, deterministic=True)
    token, expert, valid = (np.asarray(a) for a in (routing.token, routing.expert, routing.valid))
    kept = {(g, s): [] for g in range(G) for s in range(S)}
    for g in range(G):
        for n in np.flatnonzero(valid[g]):
            kept[(g, int(token[g, n]))].append(int(expert[g, n]))
    return kept


def _perturbed(params, seed=3):
    """Every leaf plus noise: biases (initialised near 0) matter in the comparison."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize(
    "options, shared_expert",
    [
        ({}, _mlp),  # N=1 of the routed width
        ({"num_shared": 3, "mlp_dim": 5}, _mlp),
        ({"num_shared": 2, "expert_type": "glu", "mlp_dim": 6}, _glu),
    ],
    ids=["one-mlp", "three-mlp-width-5", "two-glu"],
)
def test_outputs_and_gradients_equal_the_token_loop_reference(options, shared_expert):
    """y[g, s] = sum over the token's kept routed experts e of gate_e x MLP_e(x) + sum over
    the N shared experts of expert_n(x); K=2, a capacity that drops some choices."""
    layer = vl.MoeLayer(
        E,
        H,
        router_options={"k": K, "capacity_factor": 0.75},
        group_size=S,
        variants={"shared_experts": options},
    )
    x_gsd = jax.random.normal(jax.random.key(0), (G, S, D))
    params = _perturbed(jax.jit(layer.init)(jax.random.key(1), x_gsd)["params"])
    num_shared = options.get("num_shared", 1)
    assert jax.tree.leaves(params["shared_experts"])[0].shape[0] == num_shared

    router = layer.make_router()
    gates = np.asarray(jax.nn.softmax(x_gsd @ params["router"]["gate"], axis=-1))
    kept = _kept_by_hand(gates, K, router.capacity(S))
    assert kept == _kept_by_router(router, params["router"], x_gsd)
    assert any(len(v) < K for v in kept.values())  # some choices dropped: not vacuous

    def fast(params, x_gsd):
        return layer.apply({"params": params}, x_gsd).output

    def slow(params, x_gsd):
        rows = []
        for g in range(G):
            row = []
            for s in range(S):
                x_d = x_gsd[g, s]
                p = jax.nn.softmax(x_d @ params["router"]["gate"])
                y = jnp.zeros(D)
                for e in kept[(g, s)]:
                    y = y + p[e] * _mlp(params["experts"], e, x_d)
                for n in range(num_shared):
                    y = y + shared_expert(params["shared_experts"], n, x_d)
                row.append(y)
            rows.append(jnp.stack(row))
        return jnp.stack(rows)

    np.testing.assert_allclose(fast(params, x_gsd), slow(params, x_gsd), rtol=1e-5, atol=1e-5)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
    got = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(params, x_gsd)
    want = jax.jit(jax.grad(loss(slow), argnums=(0, 1)))(params, x_gsd)
    pairs = zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True)
    for (path, a), b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # Every shared expert gets its own, nonzero gradient.
    for leaf in jax.tree.leaves(got[0]["shared_experts"]):
        assert all(float(jnp.abs(leaf[n]).sum()) > 0 for n in range(num_shared))


def test_registered_through_its_entry_point():
    assert "shared_experts" in vl.available_variants()
    assert vl.PLUGIN_VARIANTS["shared_experts"] == "vmoe-moe-shared-experts"
    assert vl.VARIANTS.provider("shared_experts").startswith(
        'shared_experts (entry point "shared_experts = vmoe_moe_shared_experts.plugin" from '
        "vmoe-moe-shared-experts"
    )
    variant = vl.get_variant("shared_experts", num_shared=2)
    assert isinstance(variant, SharedExperts) and variant.num_shared == 2


def test_without_the_plugin_the_error_names_the_package_to_install():
    manager = vmoe_plugins.plugin_manager()
    name = manager.get_name(vmoe_moe_shared_experts.plugin)  # its entry point's name
    vmoe_plugins.unregister_plugin(name)
    try:
        assert "shared_experts" not in vl.available_variants()
        with pytest.raises(ValueError) as error:
            vl.MoeLayer(E, H, variants={"shared_experts": {}}).layer_shape()
        assert str(error.value).startswith(
            "MoE layer variant 'shared_experts' comes with the plugin package "
            "vmoe-moe-shared-experts, which is not installed: pip install "
            "vmoe-moe-shared-experts; installed: ["
        )
    finally:
        vmoe_plugins.reset()  # registers it again: the entry points load on the next lookup
    assert "shared_experts" in vl.available_variants()


def test_each_shared_expert_is_drawn_with_its_own_key():
    layer = vl.MoeLayer(E, H, variants={"shared_experts": {"num_shared": 3}})
    x = jnp.zeros((1, S, D))
    shared = jax.jit(layer.init)(jax.random.key(0), x)["params"]["shared_experts"]
    w_in = np.asarray(shared["w_in"])
    assert w_in.shape == (3, D, H)
    assert not np.allclose(w_in[0], w_in[1]) and not np.allclose(w_in[1], w_in[2])
    # The stacked spec's init is `init_stacked` of one expert's spec: N draws, one key each.
    one = vl.MlpExperts(mlp_dim=H).param_specs(D)["w_in"]
    spec = stacked_spec(one, 3)
    assert spec.shape == (3, D, H)
    key = jax.random.key(7)
    np.testing.assert_array_equal(
        spec.init(key, spec.shape, jnp.float32), init_stacked(one, key, 3, jnp.float32)
    )


def test_the_default_width_is_the_routed_experts_width_after_reshaping():
    """mlp_dim=None follows `LayerShape.mlp_dim`: with a variant that halves the routed
    experts' width (as fine-grained experts do), the shared expert is half as wide too."""

    class Halve:
        def configure(self, shape):
            return shape.replace(num_experts=2 * shape.num_experts, mlp_dim=shape.mlp_dim // 2)

    class Plugin:
        @vmoe_plugins.hookimpl
        def vmoe_moe_variants(self):
            return {"halve": Halve}

    name = vmoe_plugins.register_plugin(Plugin(), name="test-halve")
    try:
        x = jnp.zeros((1, S, D))
        for variants, width in [
            ({"shared_experts": {}}, H),
            ({"halve": {}, "shared_experts": {}}, H // 2),
            ({"halve": {}, "shared_experts": {"mlp_dim": 3}}, 3),
        ]:
            layer = vl.MoeLayer(E, H, variants=variants)
            params = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
            assert params["shared_experts"]["w_in"].shape == (1, D, width), variants
    finally:
        vmoe_plugins.unregister_plugin(name)


@pytest.mark.parametrize(
    "options, per_shared",
    [
        ({}, 4 * D * H),
        ({"num_shared": 3}, 4 * D * H),
        ({"num_shared": 2, "mlp_dim": 12}, 4 * D * 12),
        ({"num_shared": 2, "expert_type": "glu"}, 6 * D * H),  # three D x H matmuls
    ],
)
def test_the_flop_report_counts_n_shared_experts_by_hand(options, per_shared):
    """An mlp expert per token: two matmuls of D x H, 2 FLOPs per multiply-add = 4 D H; the
    branch: N of them. The whole layer's program: router + buffers + branch."""
    layer = vl.MoeLayer(
        E, H, router_options={"capacity_factor": 1.0}, variants={"shared_experts": options}
    )
    report = vl.layer_flops(layer, D, S)
    n = options.get("num_shared", 1)
    assert report.branches == {"shared_experts": n * per_shared}
    assert report.router == 2 * D * E
    capacity = -(-K * S // E)  # ceil(K S / E) at capacity factor 1: 3
    assert report.buffers == pytest.approx(E * capacity * 4 * D * H / S)
    assert report.total == pytest.approx(report.router + report.buffers + n * per_shared)


def test_k1_plus_one_shared_expert_costs_what_coarse_k2_costs():
    """E=4 experts of width H: K=2 routes 2 x 4DH per token; K=1 + one shared expert of width H
    computes 4DH routed + 4DH shared."""
    coarse = vl.layer_flops(vl.MoeLayer(E, H, router_options={"k": 2}), D, S)
    shared = vl.layer_flops(
        vl.MoeLayer(E, H, router_options={"k": 1}, variants={"shared_experts": {}}), D, S
    )
    assert coarse.routed == 2 * 4 * D * H
    assert shared.routed + shared.branches["shared_experts"] == coarse.routed


def test_the_params_are_dense_and_replicated_by_the_expert_strategy():
    layer = vl.MoeLayer(E, H, variants={"shared_experts": {"num_shared": 2}})
    params = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, S, D)))["params"]
    flat = jax.tree_util.tree_leaves_with_path(params)
    shared = [path for path, _ in flat if "shared_experts" in jax.tree_util.keystr(path)]
    assert len(shared) == 4
    assert not any(vl.is_expert_param(path) for path in shared)
    # On one device the specs still say how the 'expert' axis would split them.
    strategy = vl.get_strategy("expert", mesh_shape=(1, 1))
    specs = strategy.param_specs(params)
    assert all(spec == PartitionSpec() for spec in jax.tree.leaves(specs["shared_experts"]))
    assert all(spec == PartitionSpec("expert") for spec in jax.tree.leaves(specs["experts"]))


@pytest.mark.slow
def test_eight_devices_under_every_strategy_equal_one_device():
    """A tiny V-MoE (8 routed experts) with 2 shared experts per MoE block, one training step's
    loss and gradients on 8 host devices under data, expert, fsdp and expert_fsdp
    (vmoe-layers' `python -m vmoe_layers.strategy_check`, a subprocess: XLA_FLAGS must be set
    before jax starts) vs one device. Under `expert` the routed experts are split over the
    'expert' axis while the shared ones stay whole on every device; `init_sharded` creates the
    single-device params in each strategy's layout."""
    report = run_strategy_check(
        {"num_experts": 8, "variants": {"shared_experts": {"num_shared": 2}}}
    )
    assert set(report) == {"data", "expert", "fsdp", "expert_fsdp"}
    for name, case in report.items():
        assert case["loss"] == pytest.approx(case["reference_loss"], rel=1e-5), name
        assert case["grad_max_rel_diff"] < 1e-4, (name, case)
        assert case["init_sharded"] == {"values_match": True, "layout_ok": True}, name
    # Routed experts w_in [E=8, 16, 32], shared w_in [N=2, 16, 32]. Under `expert`: the routed
    # experts split over its 'expert' axis (4), the shared ones whole on every device.
    expert = report["expert"]
    assert expert["shard_shapes"]["experts/w_in"] == [2, 16, 32]
    assert expert["shard_shapes"]["shared_experts/w_in"] == [2, 16, 32]
    specs = expert["specs"]
    assert {tuple(v) for k, v in specs.items() if k.startswith("experts/")} == {("expert",)}
    assert {tuple(v) for k, v in specs.items() if k.startswith("shared_experts/")} == {()}
    assert report["data"]["shard_shapes"]["shared_experts/w_in"] == [2, 16, 32]
    # fsdp and expert_fsdp split w_in (1,024 elements) as any dense weight: over 'fsdp' (4),
    # over all 8 devices.
    assert report["fsdp"]["shard_shapes"]["shared_experts/w_in"] == [2, 16, 8]
    assert report["expert_fsdp"]["shard_shapes"]["shared_experts/w_in"] == [2, 16, 4]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_shared": 0}, r"shared_experts: num_shared=0 must be an integer >= 1$"),
        ({"num_shared": True}, r"num_shared=True must be an integer >= 1"),
        ({"num_shared": 1.5}, r"num_shared=1.5 must be an integer >= 1"),
        ({"mlp_dim": 0}, r"mlp_dim=0 must be an integer >= 1, or None \(the routed experts'"),
        ({"mlp_dim": "64"}, r"mlp_dim='64' must be an integer >= 1, or None"),
        (
            {"expert_type": "mpl"},
            r"expert_type='mpl' is not a registered expert type; allowed: \[.*'glu', .*'mlp'",
        ),
        ({"expert_type": None}, r"expert_type=None is not a registered expert type"),
        ({"expert_options": {"mlp_dim": 4}}, r"expert_options=\{'mlp_dim': 4\} must not set"),
        ({"expert_options": 3}, r"expert_options=3 must be a mapping"),
        (
            {"mlp_dim": 8, "expert_options": {"activation": "tanh"}},
            r"shared_experts: expert_type='mlp' with expert_options=\{'activation': 'tanh'\}: "
            r"activation='tanh' is not one of",
        ),
        ({"num_experts": 2}, r"unknown option\(s\) \['num_experts'\] for MoE layer variant"),
    ],
)
def test_bad_options_are_refused_naming_the_value_and_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        vl.MoeLayer(E, H, variants={"shared_experts": options}).layer_shape()


def test_an_expert_types_bad_option_is_refused_when_the_width_is_known():
    """With mlp_dim=None the expert type is built when the layer knows the routed width."""
    layer = vl.MoeLayer(
        E, H, variants={"shared_experts": {"expert_options": {"activation": "tanh"}}}
    )
    with pytest.raises(ValueError, match=r"shared_experts: .*activation='tanh' is not one of"):
        jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, S, D)))


def test_a_plugin_package_expert_type_not_installed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(vl.EXPERT_TYPES.known, "not_here", "vmoe-not-here")
    with pytest.raises(ValueError, match=r"pip install vmoe-not-here\); allowed: \["):
        SharedExperts(expert_type="not_here")


def test_param_specs_have_the_leading_n_axis():
    variant = SharedExperts(num_shared=3, mlp_dim=7)
    shape = vl.LayerShape(E, H, {})
    specs = variant.param_specs(D, shape)
    assert {n: s.shape for n, s in specs.items()} == {
        "w_in": (3, D, 7),
        "b_in": (3, 7),
        "w_out": (3, 7, D),
        "b_out": (3, D),
    }
    assert all(isinstance(s, ParamSpec) for s in specs.values())
