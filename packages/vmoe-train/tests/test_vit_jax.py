"""google-research/vision_transformer ("vit_jax") .npz checkpoints read into our ViT and back.

The checkpoints here are written by the test itself: names and shapes spelled out below as
vit_jax/models_vit.py's `VisionTransformer` has them in a published .npz (pre-Linen block
names), random float32. Our model's logits are compared with a float64 NumPy forward of that
layout written here from vit_jax's code, not from ours.

Measured (our float32 against float64; logits up to 3.5 with the class token and pre-logits,
1.9 with "gap"): max |difference| 1.6e-6 and 6.3e-7. The same reference with exact instead of
tanh-approximated GELU is 5.4e-4 and 2.6e-4 away, so the tolerance (1e-5 absolute plus 1e-5
relative) tells the two apart; swapped norms, swapped query/key or reordered heads move the
logits by 0.4 to 5.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_layers as vl
import vmoe_train
from vmoe_train import vit_jax
from vmoe_train.finetune import finetune_params
from vmoe_train.mismatch import TreeMismatchError
from vmoe_train.original import convert
from vmoe_train.vit_jax import load_npz, params_to_vit_jax, save_npz, vit_jax_to_params

IMAGE, PATCH, CHANNELS, HIDDEN, LAYERS, HEADS, MLP, CLASSES = 32, 8, 3, 16, 2, 2, 32, 10
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
EPS = 1e-6  # flax.linen.LayerNorm's default; vit_jax does not set it


def vit_jax_arrays(
    rng: np.random.Generator, *, classifier: str = "token", representation: int | None = 12
) -> dict[str, np.ndarray]:
    """A tiny vit_jax checkpoint: {name: random float32 array}, names and shapes as published."""

    def normal(*shape, scale=0.5):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    tokens = (IMAGE // PATCH) ** 2 + (classifier == "token")
    head_dim = HIDDEN // HEADS
    arrays = {
        "embedding/kernel": normal(PATCH, PATCH, CHANNELS, HIDDEN, scale=0.1),
        "embedding/bias": normal(HIDDEN),
        "Transformer/posembed_input/pos_embedding": normal(1, tokens, HIDDEN),
        "Transformer/encoder_norm/scale": 1 + normal(HIDDEN, scale=0.1),
        "Transformer/encoder_norm/bias": normal(HIDDEN, scale=0.1),
        "head/kernel": normal(representation or HIDDEN, CLASSES),
        "head/bias": normal(CLASSES),
    }
    if classifier == "token":
        arrays["cls"] = normal(1, 1, HIDDEN)
    if representation:
        arrays["pre_logits/kernel"] = normal(HIDDEN, representation)
        arrays["pre_logits/bias"] = normal(representation)
    for i in range(LAYERS):
        block = f"Transformer/encoderblock_{i}"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{block}/{norm}/scale"] = 1 + normal(HIDDEN, scale=0.1)
            arrays[f"{block}/{norm}/bias"] = normal(HIDDEN, scale=0.1)
        attention = f"{block}/MultiHeadDotProductAttention_1"
        for part in ("query", "key", "value"):
            arrays[f"{attention}/{part}/kernel"] = normal(HIDDEN, HEADS, head_dim)
            arrays[f"{attention}/{part}/bias"] = normal(HEADS, head_dim)
        arrays[f"{attention}/out/kernel"] = normal(HEADS, head_dim, HIDDEN)
        arrays[f"{attention}/out/bias"] = normal(HIDDEN)
        arrays[f"{block}/MlpBlock_3/Dense_0/kernel"] = normal(HIDDEN, MLP)
        arrays[f"{block}/MlpBlock_3/Dense_0/bias"] = normal(MLP)
        arrays[f"{block}/MlpBlock_3/Dense_1/kernel"] = normal(MLP, HIDDEN)
        arrays[f"{block}/MlpBlock_3/Dense_1/bias"] = normal(HIDDEN)
    return arrays


def _gelu_tanh(x):  # flax.linen.gelu = jax.nn.gelu, approximate=True by default
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_exact(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _layer_norm(x, a, prefix):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * a[f"{prefix}/scale"] + a[f"{prefix}/bias"]


def reference_logits(arrays, images, *, gelu=_gelu_tanh) -> np.ndarray:
    """vit_jax's VisionTransformer forward (eval: no dropout) in float64 NumPy, [B, classes]."""
    a = {name: array.astype(np.float64) for name, array in arrays.items()}
    b, h, w, c = images.shape
    p = a["embedding/kernel"].shape[0]
    # nn.Conv(kernel P x P, stride P, VALID) = each patch (rows, columns, channels) @ kernel.
    patches = images.astype(np.float64).reshape(b, h // p, p, w // p, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    x = patches @ a["embedding/kernel"].reshape(p * p * c, -1) + a["embedding/bias"]
    if "cls" in a:
        x = np.concatenate([np.broadcast_to(a["cls"], (b, 1, x.shape[-1])), x], axis=1)
    x = x + a["Transformer/posembed_input/pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in a:
        block = f"Transformer/encoderblock_{i}"
        att = f"{block}/MultiHeadDotProductAttention_1"
        y = _layer_norm(x, a, f"{block}/LayerNorm_0")
        q, k, v = (
            np.einsum("btd,dnk->btnk", y, a[f"{att}/{part}/kernel"]) + a[f"{att}/{part}/bias"]
            for part in ("query", "key", "value")
        )
        scores = np.einsum("bqnk,bsnk->bnqs", q, k) / math.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        heads = np.einsum("bnqs,bsnk->bqnk", weights, v)
        x = x + np.einsum("bqnk,nkd->bqd", heads, a[f"{att}/out/kernel"]) + a[f"{att}/out/bias"]
        y = _layer_norm(x, a, f"{block}/LayerNorm_2")
        mlp = f"{block}/MlpBlock_3"
        hidden = gelu(y @ a[f"{mlp}/Dense_0/kernel"] + a[f"{mlp}/Dense_0/bias"])
        x = x + hidden @ a[f"{mlp}/Dense_1/kernel"] + a[f"{mlp}/Dense_1/bias"]
        i += 1
    x = _layer_norm(x, a, "Transformer/encoder_norm")
    x = x[:, 0] if "cls" in a else x.mean(axis=1)
    if "pre_logits/kernel" in a:
        x = np.tanh(x @ a["pre_logits/kernel"] + a["pre_logits/bias"])
    return x @ a["head/kernel"] + a["head/bias"]


def _model(classifier="token", representation=12, image=IMAGE, classes=CLASSES, **overrides):
    model = vl.VisionTransformer(
        num_classes=classes,
        patch_size=PATCH,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        mlp_dim=MLP,
        classifier=classifier,
        representation_size=representation,
        **overrides,
    )
    images = jnp.zeros((1, image, image, CHANNELS))
    return model, jax.eval_shape(model.init, jax.random.key(0), images)["params"]


@pytest.mark.parametrize(("classifier", "representation"), [("token", 12), ("gap", None)])
def test_a_vit_jax_npz_loads_into_our_vit_and_computes_what_vit_jax_computes(
    tmp_path, classifier, representation
):
    rng = np.random.default_rng(0)
    written = vit_jax_arrays(rng, classifier=classifier, representation=representation)
    np.savez(tmp_path / "vit.npz", **written)  # as vit_jax's checkpoints are written
    model, target = _model(classifier, representation)

    params = vit_jax_to_params(load_npz(tmp_path / "vit.npz"), target)

    images = rng.standard_normal((4, IMAGE, IMAGE, CHANNELS)).astype(np.float32)
    ours = np.asarray(model.apply({"params": params}, images).logits)
    expected = reference_logits(written, images)
    np.testing.assert_allclose(ours, expected, **TOLERANCE)
    # The comparison can tell the two GELUs apart (and so anything that moves logits as much).
    with pytest.raises(AssertionError):
        exact = reference_logits(written, images, gelu=_gelu_exact)
        np.testing.assert_allclose(ours, exact, **TOLERANCE)


def test_params_written_with_vit_jax_names_read_back_equal(tmp_path):
    _, target = _model()
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), target)

    arrays = params_to_vit_jax(params)
    published = vit_jax_arrays(np.random.default_rng(0))
    assert {n: a.shape for n, a in arrays.items()} == {n: a.shape for n, a in published.items()}
    assert all(array.dtype == np.float32 for array in arrays.values())
    save_npz(tmp_path / "mine.npz", arrays)
    back = vit_jax_to_params(load_npz(tmp_path / "mine.npz"), target)

    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_one_error_lists_every_missing_extra_and_misshaped_array():
    _, target = _model()
    arrays = vit_jax_arrays(np.random.default_rng(0))
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_2/kernel"] = np.zeros((MLP, HIDDEN))
    query = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    arrays[query] = arrays[query].reshape(HIDDEN, HIDDEN)  # heads merged: another layout

    with pytest.raises(TreeMismatchError) as caught:
        vit_jax_to_params(arrays, target)

    error = caught.value
    assert error.missing == ["Transformer/encoderblock_1/LayerNorm_2/scale"]
    assert error.extra == ["Transformer/encoderblock_0/MlpBlock_3/Dense_2/kernel"]
    assert error.mismatched == [(query, (HIDDEN, HIDDEN), (HIDDEN, HEADS, HIDDEN // HEADS))]
    assert "3 problem(s)" in str(error)


def test_an_object_array_in_the_npz_is_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "bad.npz", cls=np.zeros((1, 1, 2)), head=np.array([{"a": 1}], object))

    with pytest.raises(ValueError, match=r"'head' cannot be read without pickle"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="object arrays cannot be written"):
        save_npz(tmp_path / "worse.npz", {"head": np.array([{"a": 1}], object)})


def test_a_pre_logits_layer_the_model_lacks_is_an_error_that_says_how_to_drop_it():
    _, target = _model(representation=None)
    arrays = vit_jax_arrays(np.random.default_rng(0), representation=12)

    with pytest.raises(TreeMismatchError, match="representation_size=12") as caught:
        vit_jax_to_params(arrays, target)
    assert caught.value.extra == ["pre_logits/bias", "pre_logits/kernel"]
    assert caught.value.mismatched == [("head/kernel", (12, CLASSES), (HIDDEN, CLASSES))]
    assert "new_head=True" in str(caught.value)


def test_fine_tuning_from_vit_jax_drops_the_pre_logits_and_head_and_resizes_positions():
    model, _ = _model(representation=None, image=48, classes=3)
    fresh = model.init(jax.random.key(0), jnp.zeros((1, 48, 48, CHANNELS)))["params"]
    arrays = vit_jax_arrays(np.random.default_rng(0), representation=12)

    params = finetune_params(fresh, vit_jax_to_params(arrays), new_head=True)

    assert "pre_logits" not in params and params["pos_embedding"].shape == (1, 37, HIDDEN)
    np.testing.assert_array_equal(params["head"]["kernel"], fresh["head"]["kernel"])
    np.testing.assert_array_equal(
        params["block_1"]["mlp"]["w_out"],
        arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"],
    )


def test_names_outside_the_vit_jax_layout_are_refused_even_without_a_target():
    arrays = vit_jax_arrays(np.random.default_rng(0))
    # The V-MoE release's spelling of the same array: `mapping` reads it, a vit_jax file has not.
    arrays["Encoder/encoder_norm/scale"] = arrays.pop("Transformer/encoder_norm/scale")

    with pytest.raises(TreeMismatchError) as caught:
        vit_jax_to_params(arrays)
    assert caught.value.extra == ["Encoder/encoder_norm/scale"]


def test_a_vmoe_has_no_vit_jax_layout():
    _, target = _model(moe=vl.MoeConfig(num_experts=2, layers=(1,)))
    with pytest.raises(ValueError, match=r"no name in a vit_jax checkpoint.*block_1/moe/"):
        vit_jax_to_params(vit_jax_arrays(np.random.default_rng(0)), target)


def test_convert_writes_a_run_of_a_vit_jax_file_bit_for_bit(tmp_path):
    # The default config's digits: 8x8x1 images; the model is read from the file's shapes.
    model = vl.create_model("ViT-Nano/4", num_classes=10)
    params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))["params"]
    vit_jax.save_npz(tmp_path / "vit.npz", vit_jax.params_to_vit_jax(params))
    converted = convert(tmp_path / "vit.npz", tmp_path / "run")
    assert converted.config.model.name == "ViT" and converted.config.model.hidden_size == 32
    restored = vmoe_train.restore_params(tmp_path / "run" / "checkpoints")
    for (path, want), got in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(restored), strict=True
    ):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
