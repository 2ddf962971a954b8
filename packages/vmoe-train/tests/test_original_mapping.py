"""Original V-MoE parameter names <-> ours, the model read from the shapes, the fit check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import original_reference as reference
import pytest

import vmoe_layers as vl
from vmoe_train.original import (
    TreeMismatchError,
    check_fit,
    infer_architecture,
    model_fields,
    params_from_original,
    params_to_original,
    to_original,
    to_ours,
)
from vmoe_train.original.mapping import flatten


def _shapes(model, image=224, channels=3):
    images = jnp.zeros((1, image, image, channels))
    params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    return {path: leaf.shape for path, leaf in flatten(params).items()}


def _release_s32():
    """The shapes of the release's V-MoE S/32 (E=8, last 2, token, representation 512)."""
    model = vl.create_model(
        "V-MoE-S/32", num_classes=1000, num_experts=8, moe_layers="last-2", representation_size=512
    )
    return {to_original(path): shape for path, shape in _shapes(model).items()}


def test_every_parameter_of_a_vmoe_has_one_original_name_and_back():
    model = vl.create_model("V-MoE-Mu/2", num_classes=10, representation_size=8)
    ours = _shapes(model, image=8, channels=1)
    names = {path: to_original(path) for path in ours}
    assert None not in names.values() and len(set(names.values())) == len(names)
    assert all(to_ours(original) == path for path, original in names.items())
    assert names["block_1/moe/experts/w_in"] == "Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"
    assert names["block_1/moe/router/gate"] == "Encoder/encoderblock_1/Moe/Router/dense/kernel"
    assert names["block_0/norm_mlp/scale"] == "Encoder/encoderblock_0/LayerNorm_1/scale"
    assert names["pos_embedding"] == "Encoder/posembed_input/pos_embedding"


def test_the_test_tree_maps_onto_our_tree_shape_for_shape():
    tree = reference.original_tree(np.random.default_rng(0))
    model = vl.create_model(
        "V-MoE-Nano/2", num_classes=10, num_experts=4, moe_layers=(1,), representation_size=16
    )
    params = params_from_original(tree)
    assert {p: np.shape(a) for p, a in flatten(params).items()} == _shapes(model, 8, 1)
    assert params_to_original(params).keys() == tree.keys()


def test_vit_automatic_names_are_read_as_aliases():
    assert to_ours("Transformer/encoderblock_3/MultiHeadDotProductAttention_1/out/bias") == (
        "block_3/attention/out/bias"
    )
    assert to_ours("Encoder/encoderblock_0/LayerNorm_2/scale") == "block_0/norm_mlp/scale"
    assert to_ours("Encoder/encoderblock_0/MlpBlock_3/Dense_1/kernel") == "block_0/mlp/w_out"


@pytest.mark.parametrize(
    "path", ["head", "embedding/weight", "Encoder/encoderblock_0/SelfAttention/query", "foo"]
)
def test_groups_and_unknown_names_have_no_counterpart(path):
    assert to_ours(path) is None


def test_glu_experts_have_no_original_name():
    with pytest.raises(ValueError, match=r"no name in the original V-MoE layout.*w_gate"):
        params_to_original({"block_1": {"moe": {"experts": {"w_gate": np.zeros((2, 3, 4))}}}})


def test_missing_extra_and_mismatched_arrays_are_reported_at_once_by_path():
    expected = _release_s32()
    found = dict(expected)
    del found["Encoder/encoderblock_5/Moe/Router/dense/kernel"]
    del found["cls"]
    found["Encoder/encoderblock_9/Mlp/Dense_0/kernel"] = (512, 2048)
    found["Encoder/encoderblock_7/Moe/Mlp/Dense_0/kernel"] = (4, 512, 2048)
    with pytest.raises(TreeMismatchError) as error:
        check_fit(expected, found, hints=["a hint"])
    e = error.value
    assert e.missing == ["Encoder/encoderblock_5/Moe/Router/dense/kernel", "cls"]
    assert e.extra == ["Encoder/encoderblock_9/Mlp/Dense_0/kernel"]
    assert e.mismatched == [
        ("Encoder/encoderblock_7/Moe/Mlp/Dense_0/kernel", (4, 512, 2048), (8, 512, 2048))
    ]
    message = str(e)
    assert "4 problem(s)" in message and message.endswith("(a hint)")
    assert "shape mismatch: Encoder/encoderblock_7/Moe/Mlp/Dense_0/kernel: checkpoint " in message


def test_the_release_s32_architecture_is_read_from_its_shapes():
    arch = infer_architecture(_release_s32())
    assert (arch.patch_size, arch.hidden_size, arch.num_layers) == (32, 512, 8)
    assert (arch.num_heads, arch.mlp_dim, arch.num_tokens, arch.image_size) == (8, 2048, 50, 224)
    assert (arch.num_experts, arch.moe_layers, arch.classifier) == (8, (5, 7), "token")
    assert (arch.representation_size, arch.num_classes) == (512, 1000)
    fields = model_fields(arch)
    assert fields["name"] == "V-MoE" and (fields["patch_size"], fields["hidden_size"]) == (32, 512)
    assert (fields["num_layers"], fields["num_heads"], fields["mlp_dim"]) == (8, 8, 2048)
    assert fields["moe"]["layers"] == "last-2" and fields["moe"]["num_experts"] == 8
    assert fields["moe"]["router_options"]["capacity_multiple_of"] == 4
    assert fields["moe"]["dispatch_dtype"] == "bfloat16"


def test_gap_models_without_representation_and_every_2_are_read():
    model = vl.create_model("V-MoE-Mu/4", num_classes=5, classifier="gap").clone(mlp_dim=96)
    shapes = {to_original(p): s for p, s in _shapes(model, image=16).items()}
    arch = infer_architecture(shapes)
    assert (arch.classifier, arch.representation_size, arch.num_tokens) == ("gap", None, 16)
    assert arch.image_size == 16
    fields = model_fields(arch)
    assert fields["moe"]["layers"] == "every-2" and fields["mlp_dim"] == 96


def test_what_cannot_be_read_is_listed_at_once():
    shapes = _release_s32()
    del shapes["embedding/kernel"]
    shapes["Encoder/encoderblock_0/SelfAttention/query/kernel"] = (512, 512)
    with pytest.raises(ValueError, match=r"2 problem\(s\)") as error:
        infer_architecture(shapes)
    assert "embedding/kernel: missing" in str(error.value)
    assert "query/kernel: shape (512, 512) must have 3 axes" in str(error.value)


def test_sizes_of_no_preset_are_read_from_the_shapes_and_given_field_by_field():
    # Heads from the query kernel [D, heads, D / heads], blocks from their names, H from the
    # first dense block's MLP, E from a router.
    shapes = reference.original_tree(
        np.random.default_rng(0), hidden=48, heads=3, layers=3, mlp=80, moe_blocks=(0, 2)
    )
    arch = infer_architecture({p: a.shape for p, a in shapes.items()})
    fields = model_fields(arch)
    sizes = {f: fields[f] for f in ("patch_size", "hidden_size", "num_layers", "num_heads")}
    assert fields["name"] == "V-MoE" and sizes == {
        "patch_size": 2,
        "hidden_size": 48,
        "num_layers": 3,
        "num_heads": 3,
    }
    assert fields["mlp_dim"] == 80 and fields["moe"]["layers"] == (0, 2)
    assert fields["moe"]["num_experts"] == 4


def test_attention_kernels_that_do_not_split_the_hidden_size_are_reported():
    shapes = {p: a.shape for p, a in reference.original_tree(np.random.default_rng(0)).items()}
    shapes["Encoder/encoderblock_0/SelfAttention/query/kernel"] = (32, 3, 8)
    with pytest.raises(ValueError, match=r"kernel: shape \(32, 3, 8\) must be \[hidden, heads"):
        infer_architecture(shapes)
