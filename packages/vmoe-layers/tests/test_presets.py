"""Presets follow the ViT / V-MoE papers; parameter counts match a hand count and the papers.

Counts use `jax.eval_shape` (shapes only): no big model is ever allocated.
"""

from __future__ import annotations

import pytest

import vmoe_layers as vl
from vmoe_layers.presets import VIT_SIZES, VMOE_SIZES


def vit_params(d, layers, mlp, patch, tokens, classes, channels=3):
    """A ViT's parameters counted by hand (class token, biases and LayerNorms included)."""
    embedding = patch * patch * channels * d + d
    cls_and_pos = d + tokens * d
    attention = 4 * (d * d + d)  # query, key, value, out projections with biases
    mlp_block = d * mlp + mlp + mlp * d + d
    norms = 2 * 2 * d
    head = d * classes + classes
    return embedding + cls_and_pos + layers * (attention + mlp_block + norms) + 2 * d + head


def moe_extra(d, mlp, experts, moe_layers):
    """What turning `moe_layers` MLP blocks into E experts adds: E-1 more MLPs and a gate."""
    return moe_layers * ((experts - 1) * (d * mlp + mlp + mlp * d + d) + d * experts)


@pytest.mark.parametrize(
    "family, size, expected",
    [
        # ViT paper (Dosovitskiy et al. 2021), Table 1: hidden, layers, MLP, heads.
        ("ViT", "B", (768, 12, 3072, 12)),
        ("ViT", "L", (1024, 24, 4096, 16)),
        ("ViT", "H", (1280, 32, 5120, 16)),
        # DeiT / AugReg: ViT-Ti and ViT-S.
        ("ViT", "Ti", (192, 12, 768, 3)),
        ("ViT", "S", (384, 12, 1536, 6)),
        # V-MoE paper / release: its S is 8 layers of 512 (S/32); B, L, H as ViT.
        ("V-MoE", "S", (512, 8, 2048, 8)),
        ("V-MoE", "B", (768, 12, 3072, 12)),
        ("V-MoE", "H", (1280, 32, 5120, 16)),
    ],
)
def test_sizes_are_the_papers(family, size, expected):
    model = vl.create_model(f"{family}-{size}/16", num_classes=10)
    assert (model.hidden_size, model.num_layers, model.mlp_dim, model.num_heads) == expected
    assert {"ViT": VIT_SIZES, "V-MoE": VMOE_SIZES}[family][size] == expected


def test_vit_b16_has_86m_parameters():
    count = vl.count_params(vl.create_model("ViT-B/16", num_classes=1000))
    # 224/16 = 14x14 patches + class token = 197 tokens.
    assert count == vit_params(768, 12, 3072, 16, 197, 1000) == 86_567_656
    assert count == pytest.approx(86e6, rel=0.01)  # ViT paper, Table 1: "86M"


def test_vit_h14_has_632m_parameters():
    count = vl.count_params(vl.create_model("ViT-H/14", num_classes=1000))
    assert count == vit_params(1280, 32, 5120, 14, 257, 1000)
    assert count == pytest.approx(632e6, rel=0.01)  # ViT paper, Table 1: "632M"


def test_vmoe_b16_every_2_with_32_experts():
    model = vl.create_model("V-MoE-B/16", num_classes=18_291, num_experts=32)  # JFT-300M head
    assert model.moe_blocks() == (1, 3, 5, 7, 9, 11)
    count = vl.count_params(model)
    dense = vit_params(768, 12, 3072, 16, 197, 18_291)
    assert count == dense + moe_extra(768, 3072, 32, 6) == 978_384_243
    # The V-MoE paper's model table lists V-MoE-B/16 (Every-2, E=32) at about 979M.
    assert count == pytest.approx(979e6, rel=0.005)


@pytest.mark.parametrize(
    "layers, moe_blocks, expected",
    [("last-2", (5, 7), 166_417_779), ("every-2", (1, 3, 5, 7), 296_632_691)],
    ids=["last-2", "every-2"],
)
def test_vmoe_s32_with_32_experts_and_the_jft_head(layers, moe_blocks, expected):
    """V-MoE-S/32 counted term by term from the architecture, not from the code's structure.

    Sources: the V-MoE release's S/32 (DESIGN.md: 8 blocks, D=512, MLP H=2048, 8 heads; "last 2"
    = blocks 5 and 7), the ViT paper's encoder (pre-LN blocks: LayerNorm, multi-head attention
    with query/key/value/out projections, LayerNorm, MLP Dense-GELU-Dense; a class token; learned
    1-D position embeddings; a final LayerNorm; a linear head), the V-MoE paper's MoE layer (E
    expert MLPs and a gate W [D, E] without bias) and JFT-300M's 18,291 classes. Images 224x224x3.
    The paper's own table is not cited: its S/32 counts could not be checked against its text.
    """
    d, blocks, h, e, patch, classes = 512, 8, 2048, 32, 32, 18_291
    tokens = (224 // patch) ** 2 + 1  # 7x7 patches + the class token = 50
    layer_norm = 2 * d  # scale and bias
    embedding = patch * patch * 3 * d + d  # a PxP stride-P convolution to D, with bias
    class_token, position = d, tokens * d
    attention = 4 * d * d + 4 * d  # q, k, v, out: [D, D] kernels (heads split D) with biases
    one_mlp = 2 * d * h + h + d  # Dense D->H and H->D with biases
    dense_block = layer_norm + attention + layer_norm + one_mlp
    moe_block = layer_norm + attention + layer_norm + e * one_mlp + d * e
    head = layer_norm + d * classes + classes  # final LayerNorm, then the linear head
    n_moe = len(moe_blocks)
    by_hand = (
        embedding + class_token + position + (blocks - n_moe) * dense_block
        + n_moe * moe_block + head
    )  # fmt: skip
    model = vl.create_model("V-MoE-S/32", num_classes=classes, num_experts=e, moe_layers=layers)
    assert model.moe_blocks() == moe_blocks
    assert vl.count_params(model) == by_hand == expected


def test_a_dense_vit_matches_its_vmoe_with_no_moe_blocks():
    vit = vl.count_params(vl.create_model("ViT-Mu/2", num_classes=10), image_size=8, channels=1)
    vmoe = vl.create_model("V-MoE-Mu/2", num_classes=10, moe_layers=())
    assert vl.count_params(vmoe, image_size=8, channels=1) == vit
    assert vit == vit_params(64, 4, 128, 2, 17, 10, channels=1)


def test_vmoe_defaults_are_the_papers():
    moe = vl.create_model("V-MoE-B/16", num_classes=10).moe
    assert (moe.num_experts, moe.layers, moe.router) == (32, "every-2", "top_k")
    assert dict(moe.router_options) == {}  # the user's options: none
    layer = vl.MoeLayer(moe.num_experts, 64, router=moe.router, router_options=moe.router_options)
    router = layer.make_router()  # what every MoE block of the model builds
    assert (router.k, router.capacity_factor) == (2, 1.05)
    assert vl.create_model("V-MoE-Mu/2", num_classes=10).moe.num_experts == 4


@pytest.mark.parametrize("name", ["ViT-X/16", "VIT-B/16", "V-MoE-B", "ViT-B/0", "B/16"])
def test_unknown_names_are_rejected(name):
    with pytest.raises(ValueError, match=rf"unknown model {name!r}; allowed: <family>-<size>"):
        vl.create_model(name, num_classes=10)


def test_a_dense_name_rejects_moe_options():
    with pytest.raises(ValueError, match=r"ViT-B/16 is a dense ViT"):
        vl.create_model("ViT-B/16", num_classes=10, num_experts=8)


@pytest.mark.parametrize(
    "option, value",
    [("num_experts", 8), ("router", "bpr"), ("router_options", {"k": 1}), ("group_size", 4),
     ("moe_layers", "last-2")],
)  # fmt: skip
def test_a_dense_name_rejects_every_moe_option(option, value):
    with pytest.raises(ValueError, match=rf"ViT-B/16 is a dense ViT: {option}= need a V-MoE name"):
        vl.create_model("ViT-B/16", num_classes=10, **{option: value})


@pytest.mark.parametrize("option", ["hidden_size", "num_layers", "patch_size", "moe"])
def test_an_override_of_what_the_preset_sets_is_rejected(option):
    with pytest.raises(ValueError, match=rf"{option}= is set by the preset 'V-MoE-B/16'"):
        vl.create_model("V-MoE-B/16", num_classes=10, **{option: None})


def test_an_unknown_override_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown option dropout= .*allowed: .*'dropout_rate'"):
        vl.create_model("ViT-B/16", num_classes=10, dropout=0.1)


def test_every_listed_preset_builds():
    for name in vl.preset_names():
        assert isinstance(vl.create_model(name, num_classes=3), vl.VisionTransformer)
