"""MoE layer variants (`vmoe_layers.variants`, hook `vmoe_moe_variants`) and the FLOP report
(`vmoe_layers.layer_flops`), with two variants registered here at run time: one reshaping the
routed part, one adding a dense branch. The real ones are plugins (vmoe-moe-fine-grained,
vmoe-moe-shared-experts), tested in their packages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_layers as vl
import vmoe_plugins
from vmoe_layers.experts import ParamSpec

D, H, E, S = 8, 16, 4, 10


class Halve:
    """Twice the experts at half the width, twice the choices."""

    def configure(self, shape: vl.LayerShape) -> vl.LayerShape:
        k = shape.router_options["k"]
        return shape.replace(
            num_experts=2 * shape.num_experts,
            mlp_dim=shape.mlp_dim // 2,
            router_options={**shape.router_options, "k": 2 * k},
        )


class Dense:
    """x -> relu(x W1) W2 with W1 [D, width x routed width]: a branch every token goes through."""

    def __init__(self, width: int = 1):
        self.width = width

    def param_specs(self, d_model, shape):
        h = self.width * shape.mlp_dim
        init = jax.nn.initializers.normal(0.5)
        return {"w1": ParamSpec((d_model, h), init), "w2": ParamSpec((h, d_model), init)}

    def __call__(self, params, x, *, shape, dtype):
        return jax.nn.relu(x @ params["w1"].astype(dtype)) @ params["w2"].astype(dtype)


class Nothing:
    pass


@pytest.fixture(autouse=True)
def test_variants():
    class Plugin:
        @vmoe_plugins.hookimpl
        def vmoe_moe_variants(self):
            return {"halve": Halve, "dense_branch": Dense, "nothing": Nothing}

    name = vmoe_plugins.register_plugin(Plugin(), name="test-variants")
    yield
    vmoe_plugins.unregister_plugin(name)


def _x():
    return jax.random.normal(jax.random.key(0), (2, S, D))


def test_a_reshaping_variant_builds_more_narrower_experts_and_more_choices():
    layer = vl.MoeLayer(E, H, router_options={"capacity_factor": 1.0}, variants={"halve": {}})
    shape = layer.layer_shape()
    assert (shape.num_experts, shape.mlp_dim, shape.router_options["k"]) == (8, 8, 4)
    params = layer.init(jax.random.key(1), _x())["params"]
    assert params["experts"]["w_in"].shape == (8, D, 8)
    assert params["router"]["gate"].shape == (D, 8)
    router = layer.make_router()
    assert (router.num_experts, router.k) == (8, 4)
    out = layer.apply({"params": params}, _x())
    assert out.metrics["expert_load"].shape == (8,)


def test_a_branch_adds_its_output_for_every_token():
    plain = vl.MoeLayer(E, H)
    layer = vl.MoeLayer(E, H, variants={"dense_branch": {"width": 2}})
    params = layer.init(jax.random.key(1), _x())["params"]
    assert params["dense_branch"]["w1"].shape == (D, 2 * H)
    assert not vl.is_expert_param(
        jax.tree_util.tree_flatten_with_path(params["dense_branch"])[0][0][0]
    )
    without = {k: v for k, v in params.items() if k != "dense_branch"}
    routed = plain.apply({"params": without}, _x()).output
    branch = np.maximum(np.asarray(_x()) @ params["dense_branch"]["w1"], 0)
    branch = branch @ params["dense_branch"]["w2"]
    np.testing.assert_allclose(
        layer.apply({"params": params}, _x()).output, routed + branch, rtol=1e-5, atol=1e-5
    )
    # Its gradient flows.
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, _x()).output ** 2))(params)
    assert float(jnp.abs(grads["dense_branch"]["w1"]).sum()) > 0


def test_variants_are_checked_by_name_with_the_package_to_install(monkeypatch):
    # A known plugin variant that is not installed (the repository's may be, in this venv).
    monkeypatch.setitem(vl.VARIANTS.known, "not_here", "vmoe-moe-not-here")
    with pytest.raises(ValueError, match=r"pip install vmoe-moe-not-here"):
        vl.MoeLayer(E, H, variants={"not_here": {}}).layer_shape()
    assert vl.PLUGIN_VARIANTS["shared_experts"] == "vmoe-moe-shared-experts"
    with pytest.raises(TypeError, match=r"neither `configure` nor"):
        vl.MoeLayer(E, H, variants={"nothing": {}}).layer_shape()
    with pytest.raises(TypeError, match=r"variants\['halve'\]=3: must be a mapping"):
        vl.MoeLayer(E, H, variants={"halve": 3}).layer_shape()
    assert {"halve", "dense_branch"} <= set(vl.available_variants())


def test_a_model_passes_its_variants_to_every_moe_layer():
    moe = vl.MoeConfig(4, "every-2", variants={"halve": {}, "dense_branch": {}})
    model = vl.VisionTransformer(
        num_classes=3, patch_size=4, hidden_size=D, num_layers=2, num_heads=2, mlp_dim=H, moe=moe
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    assert params["block_1"]["moe"]["experts"]["w_in"].shape == (8, D, H // 2)
    assert params["block_1"]["moe"]["dense_branch"]["w1"].shape == (D, H // 2)
    assert vl.model_router(model).k == 4
    hash(moe)  # flax modules holding it must hash


@pytest.mark.parametrize(
    "variants", [{}, {"halve": {}}, {"dense_branch": {}}, {"halve": {}, "dense_branch": {}}]
)
def test_the_flop_report_by_hand(variants):
    """mlp expert: 2 matmuls of D x H per token, 2 FLOPs per multiply-add = 4 D H. The gate:
    2 D E. Buffers: E x C slots per group of S tokens, C = ceil(K S c / E) (c = 1: C = 5)."""
    layer = vl.MoeLayer(E, H, router_options={"capacity_factor": 1.0}, variants=variants)
    report = vl.layer_flops(layer, D, S)
    m = 2 if "halve" in variants else 1
    e, h, k = E * m, H // m, 2 * m
    capacity = -(-k * S // e)  # ceil: 5 whatever m
    assert report.router == 2 * D * e
    assert report.expert == 4 * D * h
    assert (report.k, report.routed) == (k, k * 4 * D * h)
    assert report.capacity == capacity
    assert report.buffers == pytest.approx(e * capacity * 4 * D * h / S)
    branch = 4 * D * h if "dense_branch" in variants else 0
    assert sum(report.branches.values()) == pytest.approx(branch)
    # The whole layer's program is the sum of its parts.
    assert report.total == pytest.approx(report.router + report.buffers + branch)
    # Equal FLOPs per token routed whatever the granularity: K x 4 D H.
    assert report.routed == 2 * 4 * D * H


def test_the_flop_report_of_a_router_with_state():
    """The aux-free router (vmoe-layers' test extra) keeps a bias as state: counted alike."""
    plain = vl.layer_flops(vl.MoeLayer(E, H), D, S)
    stateful = vl.layer_flops(vl.MoeLayer(E, H, router="aux_free"), D, S)
    assert (stateful.router, stateful.routed, stateful.total) == (
        plain.router,
        plain.routed,
        plain.total,
    )


def test_matmul_flops_counts_dot_generals_inside_scans_and_jits():
    a = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    b = jax.ShapeDtypeStruct((4, 5), jnp.float32)
    assert vl.matmul_flops(jnp.dot, a, b) == 2 * 3 * 4 * 5

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (jax.jit(jnp.dot)(a, b), None), jnp.zeros((3, 5)), None, 7)

    assert vl.matmul_flops(scanned, a, b) == 7 * 2 * 3 * 4 * 5
