"""Fine-tuning params: compatible params load, the head is new, position embeddings resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bilinear_reference import bilinear_by_hand

import vmoe_layers as vl
from vmoe_train.finetune import finetune_params, resize_pos_embedding


def _params(model, size):
    images = jnp.zeros((1, size, size, 1))
    return jax.device_get(jax.jit(model.init)(jax.random.key(0), images)["params"])


def _sample_positions(old_side, new_side):
    """Where output cell i samples the old grid, in old cell units: half-pixel centres
    ((i + 0.5) * old / new - 0.5), clamped to the grid (upsampling only needs the clamp)."""
    return np.clip((np.arange(new_side) + 0.5) * old_side / new_side - 0.5, 0, old_side - 1)


def _bilinear_by_hand(grid, new_side):
    """[n, n, D] -> [m, m, D], m >= n, sampled at half-pixel centres."""
    return bilinear_by_hand(grid, _sample_positions(grid.shape[0], new_side))


def test_new_class_count_and_resolution():
    old = vl.create_model("V-MoE-Nano/2", num_classes=10)
    new = vl.create_model("V-MoE-Nano/2", num_classes=3)
    loaded, fresh = _params(old, 8), _params(new, 12)  # 16 -> 36 patches
    params = finetune_params(fresh, loaded)
    assert params["head"]["kernel"].shape == (32, 3)
    np.testing.assert_array_equal(params["head"]["kernel"], fresh["head"]["kernel"])
    np.testing.assert_array_equal(
        params["block_1"]["moe"]["experts"]["w_in"], loaded["block_1"]["moe"]["experts"]["w_in"]
    )
    assert params["pos_embedding"].shape == (1, 37, 32)
    np.testing.assert_array_equal(params["pos_embedding"][0, 0], loaded["pos_embedding"][0, 0])
    # The 4x4 patch grid of the checkpoint's (random) embeddings, resized to 6x6 by hand.
    old_grid = np.asarray(loaded["pos_embedding"][0, 1:], np.float64).reshape(4, 4, 32)
    np.testing.assert_allclose(
        np.asarray(params["pos_embedding"][0, 1:]).reshape(6, 6, 32),
        _bilinear_by_hand(old_grid, 6),
        rtol=1e-5,
        atol=1e-6,
    )
    # The new model runs on the new resolution with these params.
    out = jax.jit(new.apply)({"params": params}, jnp.zeros((2, 12, 12, 1)))
    assert out.logits.shape == (2, 3)


def test_keeping_the_head_when_classes_match():
    model = vl.create_model("ViT-Nano/2", num_classes=4)
    loaded = jax.tree.map(lambda x: x + 1.0, _params(model, 8))
    params = finetune_params(_params(model, 8), loaded, new_head=False)
    np.testing.assert_array_equal(params["head"]["kernel"], loaded["head"]["kernel"])


def test_a_new_head_leaves_the_checkpoints_pre_logits_behind():
    """The V-MoE release's fine-tuning: pre-trained with a pre-logits layer, fine-tuned without."""
    model = vl.create_model("ViT-Nano/2", num_classes=4)
    loaded = _params(model.clone(representation_size=32), 8)
    fresh = _params(model, 8)
    params = finetune_params(fresh, loaded)
    assert "pre_logits" not in params
    np.testing.assert_array_equal(params["head"]["kernel"], fresh["head"]["kernel"])
    np.testing.assert_array_equal(params["embedding"]["kernel"], loaded["embedding"]["kernel"])
    # Keeping the head needs the pre-logits it was trained on.
    with pytest.raises(ValueError, match=r"not in the model: pre_logits/bias"):
        finetune_params(fresh, loaded, new_head=False)


def test_resize_pos_embedding_by_hand():
    # 2x2 -> 4x4, written out: a row of the new grid samples the old rows at -0.25, 0.25, 0.75,
    # 1.25 (clamped to 0 and 1), i.e. weights (1, 0), (3/4, 1/4), (1/4, 3/4), (0, 1).
    # Old grid [[0, 4], [8, 12]] (8 per row, 4 per column); the class token's row is 9.
    grid = np.array([0.0, 4.0, 8.0, 12.0]).reshape(1, 4, 1)
    with_cls = np.concatenate([np.full((1, 1, 1), 9.0), grid], axis=1)
    resized = resize_pos_embedding(with_cls, (1, 1 + 16, 1), has_class_token=True)
    expected = [
        [0.0, 1.0, 3.0, 4.0],
        [2.0, 3.0, 5.0, 6.0],
        [6.0, 7.0, 9.0, 10.0],
        [8.0, 9.0, 11.0, 12.0],
    ]
    assert resized.shape == (1, 17, 1) and resized[0, 0, 0] == 9.0
    np.testing.assert_allclose(resized[0, 1:, 0].reshape(4, 4), expected, rtol=0, atol=1e-6)

    # A grid linear in (row, col), a different slope per channel, 4x4 -> 7x7: the new grid is
    # the same linear function at the sample positions (clamped at the border); the class
    # token's row (not on the grid) is kept bit for bit.
    rows, cols = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
    ramp = np.stack([3 * rows + 0.5 * cols + 1, -2 * cols + rows - 7], -1).reshape(1, 16, 2)
    cls = np.array([[[0.123456789, -98.7654321]]], np.float32)
    embedding = np.concatenate([cls, ramp], axis=1).astype(np.float32)
    resized = resize_pos_embedding(embedding, (1, 1 + 49, 2), has_class_token=True)
    assert resized.dtype == np.float32 and resized.shape == (1, 50, 2)
    np.testing.assert_array_equal(resized[0, 0], cls[0, 0])
    y, x = np.meshgrid(_sample_positions(4, 7), _sample_positions(4, 7), indexing="ij")
    expected = np.stack([3 * y + 0.5 * x + 1, -2 * x + y - 7], -1)
    np.testing.assert_allclose(resized[0, 1:].reshape(7, 7, 2), expected, rtol=0, atol=1e-5)
    # Without a class token every row is the grid.
    plain = resize_pos_embedding(embedding[:, 1:], (1, 49, 2), has_class_token=False)
    np.testing.assert_array_equal(plain, resized[:, 1:])

    constant = np.ones((1, 1 + 4, 2))
    np.testing.assert_allclose(resize_pos_embedding(constant, (1, 1 + 16, 2), True), 1.0)
    with pytest.raises(ValueError, match="only square patch grids"):
        resize_pos_embedding(np.ones((1, 1 + 6, 2)), (1, 1 + 16, 2), True)


def test_a_checkpoint_of_another_model_is_refused_naming_every_path():
    loaded = _params(vl.create_model("ViT-Nano/2", num_classes=3), 8)
    fresh = _params(vl.create_model("V-MoE-Nano/2", num_classes=3), 8)
    with pytest.raises(
        ValueError,
        match=r"does not fit the model .*missing in the checkpoint: "
        r"block_1/moe/experts/w_in.*not in the model: block_1/mlp/w_in",
    ):
        finetune_params(fresh, loaded)
