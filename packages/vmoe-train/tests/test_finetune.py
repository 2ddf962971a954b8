"""Fine-tuning params: compatible params load, the head is new, position embeddings resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_layers as vl
from vmoe_train.finetune import finetune_params, resize_pos_embedding


def _params(model, size):
    images = jnp.zeros((1, size, size, 1))
    return jax.device_get(model.init(jax.random.key(0), images)["params"])


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
    # The new model runs on the new resolution with these params.
    out = new.apply({"params": params}, jnp.zeros((2, 12, 12, 1)))
    assert out.logits.shape == (2, 3)


def test_keeping_the_head_when_classes_match():
    model = vl.create_model("ViT-Nano/2", num_classes=4)
    loaded = jax.tree.map(lambda x: x + 1.0, _params(model, 8))
    params = finetune_params(_params(model, 8), loaded, new_head=False)
    np.testing.assert_array_equal(params["head"]["kernel"], loaded["head"]["kernel"])


def test_resize_pos_embedding_by_hand():
    # A constant grid stays constant; a 2x2 grid resized to 2x2 is unchanged; class row kept.
    grid = np.arange(4.0).reshape(1, 4, 1)
    with_cls = np.concatenate([np.full((1, 1, 1), 9.0), grid], axis=1)
    same = resize_pos_embedding(with_cls, (1, 5, 1), has_class_token=True)
    np.testing.assert_allclose(same, with_cls)
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
