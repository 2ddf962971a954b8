"""ViT and V-MoE models: shapes, pooling, pre-logits, MoE placement, per-call K and capacity."""

from __future__ import annotations

import dataclasses
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_layers as vl
import vmoe_routing

B, IMAGE, CHANNELS, CLASSES = 4, 8, 1, 10  # 8x8 one-channel images, like the embedded digits


def _images(seed=0, size=IMAGE):
    return jax.random.normal(jax.random.key(seed), (B, size, size, CHANNELS))


@functools.cache
def _init(model):
    return jax.jit(model.init)(jax.random.key(0), _images())


@functools.cache
def _jitted_apply(model, **static):
    """One compiled apply per (model, static options): calls with other params, images or rngs
    reuse it (a new functools.partial per call would trace and compile again)."""
    return jax.jit(
        lambda variables, images, rngs: model.apply(variables, images, rngs=rngs, **static)
    )


def _apply(model, variables, images, rngs=None, **static):
    return _jitted_apply(model, **static)(variables, images, rngs)


VMOE = vl.create_model("V-MoE-Nano/2", num_classes=CLASSES, moe_layers=[0, 1])
VIT = vl.create_model("ViT-Nano/2", num_classes=CLASSES)


def test_vit_outputs_logits_and_pre_logits():
    out = _apply(VIT, _init(VIT), _images())
    assert out.logits.shape == (B, CLASSES)
    assert out.pre_logits.shape == (B, 32)
    assert float(out.aux_loss) == 0 and out.metrics == {} and out.aux_losses == {}


def test_logits_are_the_head_applied_to_the_pre_logits():
    variables = _init(VIT)
    head = {"kernel": jax.random.normal(jax.random.key(1), (32, CLASSES)), "bias": jnp.ones(10)}
    variables = {"params": {**variables["params"], "head": head}}
    out = _apply(VIT, variables, _images())
    np.testing.assert_allclose(
        out.logits, out.pre_logits @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5
    )


def test_without_a_head_logits_are_the_pre_logits():
    model = VIT.clone(num_classes=None)
    variables = _init(model)
    assert "head" not in variables["params"]
    out = _apply(model, variables, _images())
    np.testing.assert_array_equal(out.logits, out.pre_logits)


def test_token_classifier_adds_a_class_token_and_gap_does_not():
    token = _init(VIT)["params"]
    gap = _init(VIT.clone(classifier="gap"))["params"]
    assert token["cls"].shape == (1, 1, 32) and "cls" not in gap
    assert token["pos_embedding"].shape == (1, 16 + 1, 32)  # 4x4 patches of 2x2 + class token
    assert gap["pos_embedding"].shape == (1, 16, 32)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_pre_logits_ignore_patch_order_without_position_embeddings(classifier):
    # Attention and per-token MLPs are permutation-equivariant; the class token or the mean of
    # tokens is then invariant. Checks that pooling reads the right tokens.
    model = VIT.clone(classifier=classifier)
    params = dict(_init(model)["params"])
    params["pos_embedding"] = jnp.zeros_like(params["pos_embedding"])
    images = _images()
    first, other = images[:, 0:2, 0:2], images[:, 6:8, 4:6]  # two 2x2 patches
    swapped = images.at[:, 0:2, 0:2].set(other).at[:, 6:8, 4:6].set(first)
    a = _apply(model, {"params": params}, images).pre_logits
    b = _apply(model, {"params": params}, swapped).pre_logits
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(a, _apply(model, {"params": params}, _images(1)).pre_logits)


def test_representation_size_adds_a_tanh_pre_logits_layer():
    model = VIT.clone(representation_size=12)
    out = _apply(model, _init(model), _images())
    assert out.pre_logits.shape == (B, 12)
    assert float(jnp.max(jnp.abs(out.pre_logits))) <= 1.0


def test_head_bias_init_sets_the_initial_bias_and_keeps_the_kernel_zero():
    model = VIT.clone(head_bias_init=-float(np.log(CLASSES)))
    head = _init(model)["params"]["head"]
    np.testing.assert_array_equal(head["bias"], np.full(CLASSES, -np.log(CLASSES), np.float32))
    np.testing.assert_array_equal(head["kernel"], np.zeros((32, CLASSES), np.float32))
    # Zero kernel: every image starts with the bias as its logits (the prior of a sigmoid loss).
    np.testing.assert_array_equal(_apply(model, _init(model), _images()).logits[0], head["bias"])


def test_shared_expert_init_copies_one_draw_to_every_expert():
    shared = VMOE.clone(moe=dataclasses.replace(VMOE.moe, expert_init="shared"))
    experts = _init(shared)["params"]["block_0"]["moe"]["experts"]
    independent = _init(VMOE)["params"]["block_0"]["moe"]["experts"]
    for name, value in experts.items():
        assert value.shape == independent[name].shape
        for e in range(1, value.shape[0]):
            np.testing.assert_array_equal(value[e], value[0])
        assert not np.array_equal(independent[name][1], independent[name][0])
    # The shared draw is one expert's initialiser (same scale as an independent draw).
    np.testing.assert_allclose(np.std(experts["w_in"][0]), np.std(independent["w_in"][0]), rtol=0.2)
    bad = VMOE.clone(moe=dataclasses.replace(VMOE.moe, expert_init="split"))
    with pytest.raises(ValueError, match=r"expert_init='split' must be one of \('independent'"):
        jax.eval_shape(bad.init, jax.random.key(0), _images())


def test_moe_dropout_rate_drops_the_moe_output_of_a_model_without_dropout():
    model = VMOE.clone(moe=dataclasses.replace(VMOE.moe, dropout_rate=0.5))
    variables = _init(VMOE)
    rngs = {"dropout": jax.random.key(0), "gating": jax.random.key(1)}
    plain = _apply(VMOE, variables, _images(), train=True, rngs=rngs).pre_logits
    dropped = _apply(model, variables, _images(), train=True, rngs=rngs).pre_logits
    assert not np.allclose(plain, dropped)


@functools.cache
def _loss_and_grads(model):
    images = _images()

    @jax.jit
    def run(params):
        def loss(params):
            rngs = {"gating": jax.random.key(1), "dropout": jax.random.key(2)}
            out = model.apply({"params": params}, images, train=True, rngs=rngs)
            return jnp.mean(out.logits**2) + out.aux_loss

        return jax.value_and_grad(loss)(params)

    return run(_init(VMOE)["params"])


@pytest.mark.parametrize(
    "remat", ["block", *(pytest.param(r, marks=pytest.mark.extended) for r in ("moe", "dots"))]
)
def test_remat_gives_the_same_loss_and_gradients(remat):
    model = VMOE.clone(remat=remat, dropout_rate=0.1)  # dropout and gating noise recomputed too
    shapes = jax.eval_shape(model.init, jax.random.key(0), _images())  # the same parameters
    assert jax.tree.structure(shapes) == jax.tree.structure(_init(VMOE))
    loss, grads = _loss_and_grads(model)
    ref_loss, ref_grads = _loss_and_grads(VMOE.clone(dropout_rate=0.1))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads
    )


def test_remat_keeps_less_for_the_backward_pass():
    """Bytes the forward pass of V-MoE-S/32 (batch 16 at 224 px) keeps for the backward pass,
    the vjp's residuals (traced, not compiled): "block" keeps each block's input, "dots" its
    matmul outputs too, "moe" remats only the two MoE blocks."""
    model = vl.create_model(
        "V-MoE-S/32", num_classes=1000, num_experts=8, moe_layers="last-2", group_size=8 * 50
    )
    images = jnp.zeros((16, 224, 224, 3))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), images)["params"])

    def kept(remat):
        def loss(params):
            rngs = {"gating": jax.random.key(1)}
            out = model.clone(remat=remat).apply({"params": params}, images, train=True, rngs=rngs)
            return jnp.mean(out.logits)

        residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))

    sizes = {remat: kept(remat) for remat in vl.REMAT}
    assert sizes["none"] > sizes["moe"] > sizes["dots"] > sizes["block"]
    assert sizes["block"] < 0.5 * sizes["none"]
    with pytest.raises(ValueError, match=r"remat='all' must be one of \('none', 'block'"):
        jax.eval_shape(VMOE.clone(remat="all").init, jax.random.key(0), _images())


def test_moe_blocks_hold_experts_and_dense_blocks_an_mlp():
    model = vl.create_model("V-MoE-Mu/2", num_classes=CLASSES, moe_layers="last-1")
    shapes = jax.eval_shape(model.init, jax.random.key(0), _images())["params"]
    assert model.moe_blocks() == (3,)
    for i in range(4):
        block = shapes[f"block_{i}"]
        if i == 3:
            assert "mlp" not in block and block["moe"]["experts"]["w_in"].shape == (4, 64, 128)
            assert block["moe"]["router"]["gate"].shape == (64, 4)
        else:
            assert "moe" not in block and block["mlp"]["w_in"].shape == (64, 128)


def test_vmoe_reports_aux_loss_and_metrics_per_moe_block():
    out = _apply(VMOE, _init(VMOE), _images())
    assert set(out.metrics) == {"moe_block_0", "moe_block_1"}
    assert set(out.aux_losses) == {"moe_block_0", "moe_block_1"}
    assert {"dropped_fraction", "expert_load"} <= set(out.metrics["moe_block_0"])
    # Losses and metrics are kept apart: a loss can never overwrite a metric of the same name.
    assert set(out.aux_losses["moe_block_0"]) == {"importance", "load"}
    assert not set(out.metrics["moe_block_0"]) & {"importance", "load"}
    weighted = sum(0.005 * (m["importance"] + m["load"]) for m in out.aux_losses.values())
    np.testing.assert_allclose(out.aux_loss, weighted, rtol=1e-5)


def test_per_call_k_and_capacity_override_without_touching_params():
    variables = _init(VMOE)
    before = jax.tree.map(np.asarray, variables)
    default = _apply(VMOE, variables, _images())
    low = _apply(VMOE, variables, _images(), k=1, capacity_factor=0.5)
    rebuilt = VMOE.clone(moe=vl.MoeConfig(4, [0, 1], "top_k", {"k": 1, "capacity_factor": 0.5}))
    expected = _apply(rebuilt, variables, _images()).pre_logits
    np.testing.assert_allclose(low.pre_logits, expected, rtol=1e-5, atol=1e-6)
    assert float(low.metrics["moe_block_0"]["dropped_fraction"]) > float(
        default.metrics["moe_block_0"]["dropped_fraction"]
    )
    assert not np.allclose(low.pre_logits, default.pre_logits)
    jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_training_mode_uses_dropout_and_gating_rngs():
    model = VMOE.clone(dropout_rate=0.1)
    variables = _init(model)

    def train(seed):
        rngs = {"dropout": jax.random.key(seed), "gating": jax.random.key(seed + 1)}
        return _apply(model, variables, _images(), train=True, rngs=rngs).pre_logits

    np.testing.assert_array_equal(train(0), train(0))
    assert not np.allclose(train(0), train(5))
    assert not np.allclose(train(0), _apply(model, variables, _images()).pre_logits)


def test_bfloat16_model():
    model = VMOE.clone(dtype=jnp.bfloat16)
    variables = _init(VMOE)
    out = _apply(model, variables, _images())
    assert out.pre_logits.dtype == jnp.bfloat16
    full = _apply(VMOE, variables, _images())
    np.testing.assert_allclose(
        out.pre_logits.astype(jnp.float32), full.pre_logits, rtol=0.1, atol=0.1
    )


def test_glu_feed_forward_everywhere():
    model = VMOE.clone(mlp_type="glu")
    params = jax.eval_shape(model.init, jax.random.key(0), _images())["params"]
    assert set(params["block_0"]["moe"]["experts"]) == {"w_gate", "w_up", "w_out"}


def test_the_small_vmoe_preset_trains_on_the_cpu():
    model = vl.create_model("V-MoE-Nano/2", num_classes=CLASSES, dropout_rate=0.0)
    images = _images(3)
    labels = jnp.arange(B) % CLASSES
    params = _init(model)["params"]

    @jax.jit
    def step(params, rng):
        def loss_fn(params):
            out = model.apply({"params": params}, images, train=True, rngs={"gating": rng})
            xent = -jnp.mean(jax.nn.log_softmax(out.logits)[jnp.arange(B), labels])
            return xent + out.aux_loss, xent

        (_, xent), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), xent

    losses = []
    for i in range(30):
        params, xent = step(params, jax.random.key(i))
        losses.append(float(xent))
    assert losses[0] == pytest.approx(np.log(CLASSES), rel=1e-3)  # zero-initialised head
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("size", [7, 9])
def test_image_size_must_be_a_multiple_of_the_patch_size(size):
    message = rf"image size {size}x{size} is not divisible by patch_size=2"
    with pytest.raises(ValueError, match=message):
        VIT.init(jax.random.key(0), _images(size=size))


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match=r"num_heads=3 does not divide hidden_size=32"):
        VIT.clone(num_heads=3).init(jax.random.key(0), _images())


def test_classifier_must_be_known():
    with pytest.raises(ValueError, match=r"classifier='cls' must be one of \('token', 'gap'\)"):
        VIT.clone(classifier="cls").init(jax.random.key(0), _images())


def test_moe_group_size_must_divide_the_tokens():
    model = VMOE.clone(moe=vl.MoeConfig(4, [0], group_size=5))
    with pytest.raises(ValueError, match=r"group_size=5 does not divide the 68 tokens"):
        model.init(jax.random.key(0), _images())


def test_moe_groups_can_span_images():
    model = VMOE.clone(moe=vl.MoeConfig(4, [0], group_size=34))  # two images of 17 tokens
    out = _apply(model, _init(model), _images())
    assert out.logits.shape == (B, CLASSES)


@pytest.mark.parametrize("patch_size", [0, -2])
def test_a_patch_size_below_one_is_rejected(patch_size):
    model = vl.create_model("ViT-Nano/2", num_classes=3).clone(patch_size=patch_size)
    with pytest.raises(ValueError, match=rf"patch_size={patch_size} must be an integer >= 1"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_attention_is_vits_xavier_uniform_with_a_dropout_mask_per_head():
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.MultiHeadDotProductAttention):
            seen.append(context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        params = VIT.init(jax.random.key(0), _images())["params"]
    assert seen and all(not m.broadcast_dropout for m in seen)
    # xavier_uniform over the flattened [D, D] kernel: bound sqrt(6 / (D + D)) (lecun_normal,
    # flax's default, would exceed it for some of the 1,024 entries).
    kernel = np.asarray(params["block_0"]["attention"]["query"]["kernel"])
    bound = np.sqrt(6 / (32 + 32))
    assert 0.8 * bound < np.abs(kernel).max() <= bound


def test_the_dense_feed_forward_drops_hidden_activations_in_training():
    ff = vl.FeedForward(mlp_dim=64, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    params = ff.init(jax.random.key(1), x)
    clean = ff.apply(params, x)
    np.testing.assert_array_equal(ff.apply(params, x, deterministic=True), clean)
    train = ff.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    # Dropout on the hidden units mixes into every output: unlike output dropout, outputs are
    # neither 0 nor 2x the clean ones.
    output_dropout_like = np.isclose(train, 0) | np.isclose(train, 2 * clean, rtol=1e-5)
    assert output_dropout_like.mean() < 0.05
    # With the hidden layer zeroed the built-in MLP returns its output bias.
    mlp = vl.get_expert_type("mlp", mlp_dim=64)
    expert_params = {n: p[None] for n, p in params["params"].items()}
    y = mlp(expert_params, x.reshape(1, -1, 16), dtype=jnp.float32, hidden=lambda h: 0 * h)
    np.testing.assert_allclose(y[0], np.broadcast_to(params["params"]["b_out"], y[0].shape))


def test_an_expert_type_without_hidden_runs_densely_without_hidden_dropout():
    @dataclasses.dataclass(frozen=True)
    class Linear:
        mlp_dim: int

        def param_specs(self, d):
            return {"w": vl.ParamSpec((d, d), jax.nn.initializers.lecun_normal())}

        def __call__(self, params, x_etd, *, dtype):
            return jnp.einsum("etd,edf->etf", x_etd, params["w"].astype(dtype))

    @vmoe_routing.hookimpl
    def vmoe_expert_types():
        return {"linear_test": Linear}

    plugin = types.SimpleNamespace(vmoe_expert_types=vmoe_expert_types)
    vmoe_routing.register_plugin(plugin, "linear_test")
    try:
        ff = vl.FeedForward(mlp_dim=1, expert_type="linear_test", dropout_rate=0.5)
        x = jax.random.normal(jax.random.key(0), (2, 4, 8))
        params = ff.init(jax.random.key(1), x)
        train = ff.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
        np.testing.assert_allclose(train, ff.apply(params, x), rtol=1e-6)
    finally:
        vmoe_routing.unregister_plugin("linear_test")
