"""A model in the original V-MoE tree layout computes, once converted, what the original computes.

The original side is `original_reference.forward` (float64 NumPy, per-token routing loops); ours
is the model the converted config builds (`converted_config` + `build_model`), float32, with the
parameters renamed by `params_from_original`. What must match for parity is in
`vmoe_train.original.architecture` (the release's settings); these tests show that each setting
matters where it should (capacity rounding, BPR, bfloat16 dispatch) and measure the agreement.

Measured (our float32 against the float64 original, logits of magnitude up to 2.8, V-MoE-Mu/2
sizes, MoE blocks 1 and 3): max |logits difference| 4.6e-6 with float32 dispatch (3.2e-6 and
2.6e-6 with drops, vanilla and BPR), 2.4e-4 with the release's bfloat16 dispatch (a value near a
bfloat16 rounding boundary can round the other way: one bfloat16 ulp, 2**-8 relative); the
float32-dispatch original is 2.4e-2 away from the bfloat16 one. Without the capacity rounding
to a multiple of 4 the original's logits move by 0.64-0.89 in the dropping cases.
"""

from __future__ import annotations

import jax
import numpy as np
import original_reference as reference
import pytest

from vmoe_train.config import load_config
from vmoe_train.original import converted_config, infer_architecture, params_from_original
from vmoe_train.setup import build_model

IMAGES, GROUP_IMAGES, TOKENS = 4, 2, 17  # 8x8 digits in 2x2 patches, plus the class token
GROUP = GROUP_IMAGES * TOKENS
F32 = {"rtol": 1e-5, "atol": 1e-5}
BF16 = {"rtol": 0, "atol": 1e-3}


@pytest.fixture(scope="module")
def tree():
    # V-MoE-Mu/2 sizes, MoE on blocks 1 and 3 ("every-2"): the first MoE block's drops reach
    # the class token through the blocks after it.
    sizes = {"hidden": 64, "layers": 4, "heads": 4, "mlp": 128, "moe_blocks": (1, 3)}
    return reference.original_tree(np.random.default_rng(0), **sizes)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).standard_normal((IMAGES, 8, 8, 1)).astype(np.float32)


def ours(tree, images, overrides=()):
    """(logits, pre_logits, the model) of the converted model, at evaluation."""
    arch = infer_architecture({path: a.shape for path, a in tree.items()})
    config = converted_config(
        arch,
        load_config("digits_vmoe"),
        [f"model.moe.group_images={GROUP_IMAGES}", *overrides],
    )
    model = build_model(config, num_classes=arch.num_classes, group_size=GROUP)
    out = jax.jit(model.apply)({"params": params_from_original(tree)}, images)
    return np.asarray(out.logits), np.asarray(out.pre_logits), model


def test_release_settings_without_drops_match_the_original(tree, images):
    # Evaluation capacity factor 4.0 (the release's): nothing drops. float32 dispatch here.
    logits, pre_logits, model = ours(tree, images, ["model.moe.dispatch_dtype=float32"])
    expected, expected_pre = reference.forward(tree, images, group_size=GROUP)
    np.testing.assert_allclose(logits, expected, **F32)
    np.testing.assert_allclose(pre_logits, expected_pre, **F32)
    assert model.classifier == "token" and model.representation_size == 16
    assert model.moe_blocks() == (1, 3) and model.moe.layers == "every-2"


@pytest.mark.parametrize("router", ["top_k", "bpr"])
def test_capacity_rounded_to_a_multiple_of_4_matches_with_drops(tree, images, router):
    # C=0.5: ceil(34 * 2 * 0.5 / 4) = 9 slots, rounded up to 12 as the release did; experts
    # get about 17 choices each, so tokens drop, and which ones depends on vanilla vs BPR.
    options = [
        "model.moe.dispatch_dtype=float32",
        "model.moe.router_options.eval_capacity_factor=0.5",
        f"model.moe.router={router}",
    ]
    assert reference.capacity(GROUP, 2, 0.5, 4, multiple_of=4) == 12
    logits, _, _ = ours(tree, images, options)
    expected, _ = reference.forward(
        tree, images, group_size=GROUP, capacity_factor=0.5, batch_priority=router == "bpr"
    )
    np.testing.assert_allclose(logits, expected, **F32)
    # Each setting matters here: without the rounding, or with the other filling order, the
    # original computes something else.
    unrounded, _ = reference.forward(
        tree,
        images,
        group_size=GROUP,
        capacity_factor=0.5,
        multiple_of=1,
        batch_priority=router == "bpr",
    )
    other_order, _ = reference.forward(
        tree, images, group_size=GROUP, capacity_factor=0.5, batch_priority=router != "bpr"
    )
    assert np.abs(unrounded - expected).max() > 1e-2
    assert np.abs(other_order - expected).max() > 1e-2


def test_bfloat16_dispatch_matches_the_release_within_bfloat16_rounding(tree, images):
    logits, _, _ = ours(tree, images)  # the release's settings: bfloat16 dispatch
    expected, _ = reference.forward(tree, images, group_size=GROUP, bf16_dispatch=True)
    float32_dispatch, _ = reference.forward(tree, images, group_size=GROUP)
    np.testing.assert_allclose(logits, expected, **BF16)
    # Closer to the bfloat16 original than to a float32 one: the rounding is reproduced.
    assert np.abs(logits - expected).max() < 0.1 * np.abs(logits - float32_dispatch).max()


def test_a_model_of_no_preset_size_matches_the_original(images):
    # Hidden size 48 in 3 heads of 16, 2 blocks, MLP 96, 4 experts on block 1: no vmoe-layers
    # preset has these sizes; the converted config gives them field by field.
    tree = reference.original_tree(
        np.random.default_rng(2), hidden=48, heads=3, layers=2, mlp=96, moe_blocks=(1,)
    )
    logits, pre_logits, model = ours(tree, images, ["model.moe.dispatch_dtype=float32"])
    expected, expected_pre = reference.forward(tree, images, group_size=GROUP)
    np.testing.assert_allclose(logits, expected, **F32)
    np.testing.assert_allclose(pre_logits, expected_pre, **F32)
    assert (model.hidden_size, model.num_heads, model.num_layers, model.mlp_dim) == (48, 3, 2, 96)
    assert model.moe_blocks() == (1,) and model.moe.num_experts == 4
