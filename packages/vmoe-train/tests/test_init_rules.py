"""Initialisation rules: checkpoint paths mapped to a new model's by ordered regex rules, through
named transforms, with every problem of a call reported at once."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bilinear_reference import bilinear_by_hand
from flax import traverse_util

import vmoe_layers as vl
import vmoe_plugins
from vmoe_train import init_rules as ir
from vmoe_train.init_rules import InitRulesError, Rule, apply_rules
from vmoe_train.mismatch import TreeMismatchError


def spec(*shape, dtype=np.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def transform_one(x, target_shape, transform, dtype=np.float64):
    """`x` through one rule `transform` into a target of `target_shape`."""
    out = apply_rules(
        [Rule("x", "y", transform)], {"x": x}, {"y": spec(*target_shape, dtype=dtype)}
    )
    return out["y"]


# --- the built-in transforms -------------------------------------------------------------------


def test_copy_gives_the_array_in_the_target_dtype():
    x = np.array([[1.5, -2.25], [3.0, 4.125]], np.float32)
    y = transform_one(x, (2, 2), "copy", dtype=np.float16)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, x.astype(np.float16))


def test_copy_of_another_shape_is_reported_with_both_shapes():
    with pytest.raises(InitRulesError, match=r"source x \(3,\) -> target y \(4,\).*'copy'"):
        transform_one(np.zeros(3), (4,), "copy")


def test_tile_stacks_E_copies_on_a_new_leading_axis():
    x = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    y = transform_one(x, (3, 2, 3), "tile", dtype=np.float32)
    expected = np.array([[[1, 2, 3], [4, 5, 6]]] * 3, np.float32)
    np.testing.assert_array_equal(y, expected)


def test_tile_refuses_a_source_that_already_has_the_expert_axis():
    with pytest.raises(InitRulesError, match=r"already \(3, 2\).*'copy' it"):
        transform_one(np.zeros((3, 2)), (3, 2), "tile")


def test_tile_refuses_a_target_that_is_not_E_times_the_source_shape():
    with pytest.raises(InitRulesError, match=r"tiles to \(E, 2, 3\), not to \(4, 3, 2\)"):
        transform_one(np.zeros((2, 3)), (4, 3, 2), "tile")


def test_zoom_2x2_to_3x3_puts_midpoints_between_the_kept_corners_and_keeps_the_class_token():
    a, b, c, d, cls = 1.0, 3.0, 5.0, 11.0, -7.0
    x = np.array([[[cls], [a], [b], [c], [d]]])  # [1, 1 + 2*2, 1]
    y = transform_one(x, (1, 1 + 9, 1), "zoom")
    grid = [
        [a, (a + b) / 2, b],
        [(a + c) / 2, (a + b + c + d) / 4, (b + d) / 2],
        [c, (c + d) / 2, d],
    ]
    np.testing.assert_allclose(y[0, :, 0], [cls, *np.ravel(grid)], rtol=1e-15)


def bilinear_aligned_by_hand(grid, new_side):
    """[n, n, D] -> [m, m, D]: output cell (i, j) samples the old grid at (i, j) * (n-1)/(m-1)
    (corners on corners, as scipy.ndimage.zoom with order=1)."""
    n = grid.shape[0]
    return bilinear_by_hand(grid, np.arange(new_side) * (n - 1) / max(new_side - 1, 1))


@pytest.mark.parametrize("old_side,new_side", [(4, 6), (6, 4), (3, 7), (5, 5)])
@pytest.mark.parametrize("token", [0, 1])
def test_zoom_matches_a_slow_bilinear_reference_with_aligned_corners(old_side, new_side, token):
    x = np.random.default_rng(0).normal(size=(1, token + old_side**2, 3))
    y = transform_one(x, (1, token + new_side**2, 3), "zoom")
    np.testing.assert_array_equal(y[0, :token], x[0, :token])
    expected = bilinear_aligned_by_hand(x[0, token:].reshape(old_side, old_side, 3), new_side)
    np.testing.assert_allclose(y[0, token:].reshape(new_side, new_side, 3), expected, rtol=1e-12)


@pytest.mark.parametrize("old_side,new_side", [(14, 24), (24, 14)])
def test_zoom_gives_the_release_vit_zoom_values(old_side, new_side):
    # The release resizes the grid with scipy.ndimage.zoom(grid, factors, order=1).
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(1).normal(size=(1, 1 + old_side**2, 8))
    y = transform_one(x, (1, 1 + new_side**2, 8), "zoom")
    grid = x[0, 1:].reshape(old_side, old_side, 8)
    factor = new_side / old_side
    released = ndimage.zoom(grid, (factor, factor, 1), order=1)
    np.testing.assert_allclose(y[0, 1:].reshape(released.shape), released, atol=1e-12)


def test_zoom_refuses_to_add_or_remove_a_class_token():
    with pytest.raises(InitRulesError, match="source \\(17 tokens\\) has a class token, the tar"):
        transform_one(np.zeros((1, 17, 2)), (1, 36, 2), "zoom")


def test_zoom_refuses_a_grid_that_is_not_square():
    with pytest.raises(InitRulesError, match="7 tokens are not a square patch grid"):
        transform_one(np.zeros((1, 7, 2)), (1, 16, 2), "zoom")


def test_drop_leaves_the_source_behind():
    source = {"old_head": np.ones(3), "w": np.arange(2.0)}
    out = apply_rules([("old_head", "", "drop"), ("w", "w")], source, {"w": spec(2)})
    assert list(out) == ["w"]


def test_a_drop_rule_takes_no_target_and_only_drop_takes_an_empty_one():
    with pytest.raises(ValueError, match="a 'drop' rule has no target"):
        Rule("head/.*", "head", "drop")
    with pytest.raises(ValueError, match=r"target template is empty.*'drop'"):
        Rule("head/.*", "")


# --- matching ----------------------------------------------------------------------------------


def test_the_first_matching_rule_wins():
    source = {"block_0/w": np.arange(2.0), "block_1/w": np.arange(2.0)}
    target = {"block_0/w": spec(2), "block_1/w": spec(3, 2)}
    tile_first = [Rule("block_1/w", "block_1/w", "tile"), Rule(r"block_\d/w", r"\g<0>")]
    out = apply_rules(tile_first, source, target)
    assert out["block_0/w"].shape == (2,) and out["block_1/w"].shape == (3, 2)
    # The other order copies block_1/w too, into a target of another shape.
    with pytest.raises(InitRulesError, match=r"source block_1/w \(2,\) -> target block_1/w"):
        apply_rules(tile_first[::-1], source, target)


def test_a_rule_must_match_the_whole_path():
    with pytest.raises(InitRulesError, match=r"source block_0/w .*no rule matches it"):
        apply_rules([Rule("w", "w")], {"block_0/w": np.zeros(2)}, {"w": spec(2)})


def test_target_templates_expand_numbered_and_named_groups():
    source = {"layer_3/kernel": np.ones(2), "layer_3/bias": np.zeros(2)}
    target = {"block_3/dense/kernel": spec(2), "block_3/dense/bias": spec(2)}
    rule = Rule(r"layer_(\d+)/(?P<param>kernel|bias)", r"block_\1/dense/\g<param>")
    out = apply_rules([rule], source, target)
    np.testing.assert_array_equal(out["block_3/dense/kernel"], np.ones(2))
    np.testing.assert_array_equal(out["block_3/dense/bias"], np.zeros(2))


def test_a_template_group_that_the_regex_lacks_is_an_error_naming_the_rule():
    with pytest.raises(ValueError, match=r"rule 0 \('a\(b\)', '\\\\2', 'copy'\).*group"):
        apply_rules([Rule("a(b)", r"\2")], {"ab": np.zeros(1)}, {"b": spec(1)})


def test_config_tuples_are_rules():
    rules = ir.parse_rules([("head/.*", "", "drop"), [r"(.+)", r"\1"], Rule("x", "y", "tile")])
    assert rules == (Rule("head/.*", "", "drop"), Rule(r"(.+)", r"\1"), Rule("x", "y", "tile"))
    with pytest.raises(ValueError, match=r"rule 1 is \('a',\)"):
        ir.parse_rules([("a", "a"), ("a",)])


# --- targets left fresh ------------------------------------------------------------------------


def test_keep_fresh_excuses_only_the_targets_it_matches():
    target = {"w": spec(2), "head/kernel": spec(2, 3), "router/gate": spec(2, 4)}
    with pytest.raises(InitRulesError) as caught:
        apply_rules([("w", "w")], {"w": np.zeros(2)}, target, keep_fresh="head/.*")
    assert caught.value.missing == ["router/gate"]
    out = apply_rules([("w", "w")], {"w": np.zeros(2)}, target, keep_fresh="head/.*|router/.*")
    assert list(out) == ["w"]


def test_unmatched_init_leaves_every_unproduced_target_out():
    target = {"w": spec(2), "head/kernel": spec(2, 3)}
    out = apply_rules([("w", "w")], {"w": np.zeros(2)}, target, unmatched="init")
    assert list(out) == ["w"]


# --- every problem at once ---------------------------------------------------------------------


def test_every_problem_is_listed_in_one_error():
    source = {
        "unused_a": np.zeros(1),
        "unused_b": np.zeros(1),
        "enc/wide": np.zeros(5),  # copied into a target of 4
        "enc/twin_0": np.zeros(2),  # both sent to enc/twin
        "enc/twin_1": np.zeros(2),
        "enc/ghost": np.zeros(2),  # sent to a path the model lacks
    }
    target = {"enc/wide": spec(4), "enc/twin": spec(2), "new_a": spec(3), "new_b": spec(3)}
    rules = [(r"enc/twin_\d", "enc/twin"), (r"enc/(.*)", r"enc/\1")]
    with pytest.raises(InitRulesError) as caught:
        apply_rules(rules, source, target)
    error = caught.value
    assert isinstance(error, TreeMismatchError) and isinstance(error, ValueError)
    assert error.extra == ["enc/ghost", "unused_a", "unused_b"]
    assert error.missing == ["new_a", "new_b"]
    assert error.mismatched == [("enc/wide", (5,), (4,))]
    assert error.duplicates == {"enc/twin": ["enc/twin_0", "enc/twin_1"]}
    message = str(error)
    assert "(7 problem(s))" in message
    for expected in [
        "source unused_a (1,): no rule matches it",
        "source unused_b (1,): no rule matches it",
        "source enc/ghost: rule 1 ('enc/(.*)', 'enc/\\\\1', 'copy') sends it to enc/ghost, which",
        "target enc/twin: produced by 2 sources: enc/twin_0 (rule 0), enc/twin_1 (rule 0)",
        "source enc/wide (5,) -> target enc/wide (4,): rule 1",
        "target new_a (3,): no rule produces it",
        "target new_b (3,): no rule produces it",
    ]:
        assert expected in message


# --- transforms from plugins -------------------------------------------------------------------


def negate(x, target_shape, target_dtype):
    return -x


class NegatePlugin:
    @vmoe_plugins.hookimpl
    def vmoe_train_init_transforms(self):
        return {"negate": negate}


class CopyAgainPlugin:
    @vmoe_plugins.hookimpl
    def vmoe_train_init_transforms(self):
        return {"copy": negate}


@pytest.fixture
def negate_plugin():
    name = vmoe_plugins.register_plugin(NegatePlugin(), name="test-negate")
    yield name
    vmoe_plugins.unregister_plugin(name)


def test_a_plugin_transform_is_listed_and_applied(negate_plugin):
    assert "negate" in ir.available_transforms()
    assert ir.TRANSFORMS.provider("negate") == negate_plugin
    out = apply_rules([("w", "w", "negate")], {"w": np.array([1.0, -2.0])}, {"w": spec(2)})
    np.testing.assert_array_equal(out["w"], [-1.0, 2.0])


def test_the_built_ins_come_through_the_hook():
    assert {"copy", "tile", "zoom", "drop"} <= set(ir.available_transforms())
    assert ir.TRANSFORMS.provider("tile") == "vmoe_train.builtins (built-in)"


def test_a_transform_name_claimed_twice_is_an_error_naming_both_plugins():
    name = vmoe_plugins.register_plugin(CopyAgainPlugin(), name="test-copy-again")
    try:
        with pytest.raises(
            ValueError, match=r"'copy' is claimed by two plugins: vmoe_train.*again"
        ):
            apply_rules([("w", "w")], {"w": np.zeros(2)}, {"w": spec(2)})
    finally:
        vmoe_plugins.unregister_plugin(name)


def test_an_unknown_transform_is_an_error_listing_the_installed_ones():
    with pytest.raises(ValueError, match="unknown init transform 'tlie'") as caught:
        apply_rules([("w", "w", "tlie")], {"w": np.zeros(2)}, {"w": spec(2)})
    assert "did you mean 'tile'" in str(caught.value)
    assert all(repr(name) in str(caught.value) for name in ("copy", "drop", "tile", "zoom"))


# --- sparse upcycling on real models -----------------------------------------------------------


def random_params(model, images, seed):
    """Params of `model`'s shapes, drawn at random (any values do; no init to compile)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def dense_and_moe():
    """A dense ViT-Nano/4 and its V-MoE twin (E=2 on block 1, top_k with k = E, C = S), with
    params of each (drawn independently) and test images."""
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 12, 3)), jnp.float32)
    dense = vl.create_model("ViT-Nano/4", num_classes=None, classifier="gap")
    moe = vl.create_model(
        "V-MoE-Nano/4",
        num_classes=None,
        classifier="gap",
        num_experts=2,
        router_options={"k": 2, "capacity_factor": 1.0},
    )
    return dense, moe, random_params(dense, images, 1), random_params(moe, images, 2), images


def upcycle(moe, dense_params, moe_params):
    source = traverse_util.flatten_dict(dense_params, sep="/")
    target = traverse_util.flatten_dict(moe_params, sep="/")
    rules = ir.upcycle_rules(moe.moe_blocks())
    return apply_rules(rules, source, target, keep_fresh=ir.UPCYCLE_KEEP_FRESH), source, target


def test_upcycle_rules_start_every_expert_as_the_dense_mlp_and_copy_the_rest(dense_and_moe):
    _, moe, dense_params, moe_params, _ = dense_and_moe
    loaded, source, target = upcycle(moe, dense_params, moe_params)
    assert moe.moe_blocks() == (1,)
    assert set(loaded) == set(target) - {"block_1/moe/router/gate"}
    experts = sorted(p for p in loaded if p.startswith("block_1/moe/experts/"))
    assert experts == [f"block_1/moe/experts/{p}" for p in ("b_in", "b_out", "w_in", "w_out")]
    for path, value in loaded.items():
        expert = re.fullmatch(r"block_1/moe/experts/(.+)", path)
        if expert:
            dense_mlp = source[f"block_1/mlp/{expert[1]}"]
            assert value.shape == (2, *dense_mlp.shape)
            for e in range(2):
                np.testing.assert_array_equal(value[e], dense_mlp)
        else:
            np.testing.assert_array_equal(value, source[path])


def test_upcycled_top_k_with_k_equal_to_E_starts_exactly_as_the_dense_model(dense_and_moe):
    dense, moe, dense_params, moe_params, images = dense_and_moe
    loaded, _, target = upcycle(moe, dense_params, moe_params)
    params = traverse_util.unflatten_dict({**target, **loaded}, sep="/")  # the router: fresh
    dense_out = jax.jit(dense.apply)({"params": dense_params}, images).pre_logits
    moe_out = jax.jit(moe.apply)({"params": params}, images).pre_logits
    np.testing.assert_allclose(moe_out, dense_out, atol=1e-5)
    assert float(jnp.abs(moe_out).max()) > 0.1  # not trivially equal


def test_upcycled_top_2_of_4_with_normalized_weights_starts_exactly_as_the_dense_model(
    dense_and_moe,
):
    # The setting that makes step 0 exact at K < E: weights normalised to sum to 1 and room for
    # every choice (capacity_factor = E / K gives C = S).
    dense, _, dense_params, _, images = dense_and_moe
    moe = vl.create_model(
        "V-MoE-Nano/4",
        num_classes=None,
        classifier="gap",
        num_experts=4,
        router_options={"k": 2, "capacity_factor": 2.0, "normalize_weights": True},
    )
    moe_params = random_params(moe, images, 3)
    loaded, _, target = upcycle(moe, dense_params, moe_params)
    params = traverse_util.unflatten_dict({**target, **loaded}, sep="/")
    dense_out = jax.jit(dense.apply)({"params": dense_params}, images).pre_logits
    moe_out = jax.jit(moe.apply)({"params": params}, images).pre_logits
    np.testing.assert_allclose(moe_out, dense_out, atol=1e-5)
    # The raw weights (V-MoE's default) of the same model do not start there.
    raw_moe = dataclasses.replace(moe.moe, router_options={"k": 2, "capacity_factor": 2.0})
    raw = moe.clone(moe=raw_moe)
    raw_out = jax.jit(raw.apply)({"params": params}, images).pre_logits
    assert float(jnp.abs(raw_out - dense_out).max()) > 1e-2


def upcycled_layer(router_options):
    """An MoE layer (E=4, top_k) whose experts are tiled from a dense FeedForward's params by
    the "tile" rule, its router fresh; with the inputs and both params."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 8)), jnp.float32)
    dense = vl.FeedForward(mlp_dim=16)
    dense_params = dense.init(jax.random.key(1), x)["params"]
    layer = vl.MoeLayer(num_experts=4, mlp_dim=16, router="top_k", router_options=router_options)
    fresh = traverse_util.flatten_dict(
        layer.init(jax.random.key(2), x, deterministic=True)["params"], sep="/"
    )
    source = traverse_util.flatten_dict(dense_params, sep="/")
    loaded = apply_rules([(r"(.+)", r"experts/\1", "tile")], source, fresh, keep_fresh="router/.*")
    params = traverse_util.unflatten_dict({**fresh, **loaded}, sep="/")
    return x, dense, dense_params, layer, params


def test_an_upcycled_layer_with_normalized_top_2_weights_equals_the_dense_mlp():
    # k=2 of E=4, capacity_factor=2 (C = S: nothing dropped), weights normalised to sum to 1.
    x, dense, dense_params, layer, params = upcycled_layer(
        {"k": 2, "capacity_factor": 2.0, "normalize_weights": True}
    )
    want = dense.apply({"params": dense_params}, x)
    got = layer.apply({"params": params}, x, deterministic=True).output
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_an_upcycled_layer_with_raw_top_2_weights_scales_the_mlp_by_each_tokens_gate_sum():
    # The raw softmax weights (V-MoE's) of 2 of 4 experts sum to g1 + g2 < 1 per token: the
    # upcycled layer computes (g1 + g2) * MLP(x), which is what it differs from the dense by.
    x, dense, dense_params, layer, params = upcycled_layer({"k": 2, "capacity_factor": 2.0})
    gates = np.asarray(jax.nn.softmax(np.asarray(x, np.float64) @ params["router"]["gate"]))
    top2_sum = np.sort(gates, axis=-1)[..., -2:].sum(-1)  # [B, T]
    mlp = np.asarray(dense.apply({"params": dense_params}, x))
    got = np.asarray(layer.apply({"params": params}, x, deterministic=True).output)
    np.testing.assert_allclose(got, top2_sum[..., None] * mlp, rtol=1e-5, atol=1e-6)
    assert top2_sum.max() < 0.99  # so the dense MLP's output itself would not pass
