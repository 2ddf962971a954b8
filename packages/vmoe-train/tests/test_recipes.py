"""The shipped paper recipes against the V-MoE release's values, field by field.

The tables are written from the release's config files (google-research/vmoe,
vmoe/configs/vmoe_paper/: common.py, vmoe_s32_last2_ilsvrc2012_randaug_light1.py, its _ft_ilsvrc2012
fine-tuning, pretrain_imagenet21k.py and vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012.py),
summarised in ../shared/reference/original-recipes.md. Where that summary and the files differ,
the files win (noted at the value). Each expected value is the release's setting translated to
our field (see vmoe_train/configs/_release.py for the mapping).
"""

from __future__ import annotations

import math

import pytest

from vmoe_train import config as cfg
from vmoe_train import setup as setup_lib
from vmoe_train.config import config_get
from vmoe_train.configs.base import base_config

# common.get_vmoe_config / get_optimizer_config: every paper recipe.
MODEL = {
    "model.classifier": "token",
    "model.dropout_rate": 0.0,  # encoder and attention dropout 0.0
    "model.dtype": "float32",  # the release's model has no compute dtype (float32)
    "model.param_dtype": "float32",  # and float32 parameters
    "model.moe.num_experts": 8,  # "E=8"
    "model.moe.router": "top_k",
    "model.moe.router_options.k": 2,  # "K=2"
    "model.moe.router_options.capacity_multiple_of": 4,  # compute_capacity's multiple_of=4
    "model.moe.router_options.noise_std": 1.0,  # "Actually, it's 1.0 / num_experts"
    "model.moe.router_options.importance_loss_weight": 0.005,
    "model.moe.router_options.load_loss_weight": 0.005,
    "model.moe.group_images": 8,  # group_size = 8 x tokens per image
    "model.moe.dispatch_dtype": "bfloat16",  # dispatcher.bfloat16 = True
    "model.moe.expert_init": "shared",  # split_rngs = False
    "sharding.strategy": "expert",  # Moe/Mlp/.* split over the 'expert' mesh axis
}
# Fields a recipe may set without a release counterpart: cadence, workers, evaluation batch.
OPERATIONAL = {
    "dataset.num_workers",
    "eval_batch_size",
    "eval.every_steps",
    "checkpoint.every_steps",
    "log.every_steps",
}
PRETRAIN = {
    **MODEL,
    "num_epochs": 300.0,  # "300 Epochs"
    "num_steps": 0,
    "model.moe.router_options.capacity_factor": 1.05,
    "loss.kind": "sigmoid",  # sigmoid_xent
    "optimizer.name": "adamw",  # adam + weight decay scaled by the learning rate
    "optimizer.b1": 0.9,
    "optimizer.b2": 0.999,
    "optimizer.mu_dtype": "",  # mu_dtype float32
    "optimizer.schedule": "linear",  # warmup_linear_decay
    "optimizer.warmup_steps": 10_000,
    "optimizer.end_learning_rate": 1e-5,
    "optimizer.weight_decay": 0.1,
    "optimizer.weight_decay_on": "matrices",  # [('.*/kernel', 0.1)]
    "pp.eval": "decode(3)|resize_small(256)|central_crop(224)|value_range(-1, 1)",
}
FINETUNE_I1K_384 = {
    **MODEL,
    "dataset.name": "tfds:imagenet2012",
    "dataset.train_split": "train[:99%]",
    "dataset.eval_splits": ("train[99%:]",),
    "dataset.test_split": "validation",
    "batch_size": 1024,
    "num_steps": 10_000,  # train_steps
    "pp.train": "decode(3)|inception_crop(384)|flip_lr|value_range(-1, 1)|onehot(1000)",
    "pp.eval": "decode(3)|resize(384)|value_range(-1, 1)",
    "loss.kind": "softmax",
    "model.representation_size": 0,  # representation_size = None
    "model.head_bias_init": -math.log(1000),
    "model.moe.router_options.capacity_factor": 1.5,
    "model.moe.dropout_rate": 0.0,
    "optimizer.name": "sgd",
    "optimizer.momentum": 0.9,
    "optimizer.learning_rate": 3e-3,
    "optimizer.schedule": "cosine",  # warmup_cosine_decay
    "optimizer.warmup_steps": 500,
    "optimizer.end_learning_rate": 1e-5,
    "optimizer.weight_decay": 0.0,
    "optimizer.grad_clip_norm": 10.0,
    "finetune.new_head": True,  # the head is not restored
    "eval.capacity_factor": 0.0,  # no evaluation override: the model's C=1.5
}
RELEASE = {
    "vmoe_s32_last2_i1k": {
        **PRETRAIN,
        # randaug light1: randaug(2, 10) and mixup 0.2, per device (granularity 'device').
        "model.name": "V-MoE-S/32",
        "model.moe.layers": "last-2",
        "dataset.name": "tfds:imagenet2012",
        "dataset.train_split": "train[:99%]",
        "dataset.eval_splits": ("train[99%:]",),
        "dataset.test_split": "validation",
        "batch_size": 8192,
        "pp.train": "decode(3)|inception_crop(224)|flip_lr|randaug(2, 10)|value_range(-1, 1)|"
        "onehot(1000)|mixup(0.2, groups={local_devices}, largest_first=True)",
        "model.representation_size": 512,  # = hidden size
        "model.head_bias_init": -math.log(1000),
        "model.moe.dropout_rate": 0.2,  # this file's override (the summary .md omits it)
        "optimizer.learning_rate": 3e-3,  # this file's override of the common 1e-3
        "optimizer.grad_clip_norm": 1.0,  # this file's override
        "eval.capacity_factor": 4.0,  # evaluate.model_overrides capacity_factor 4.0
    },
    "vmoe_s32_last2_i1k_ft_i1k_384": {
        **FINETUNE_I1K_384,
        "model.name": "V-MoE-S/32",
        "model.moe.layers": "last-2",
    },
    # pretrain_imagenet21k.py, not common.py: no pre-logits layer, head bias -10, clipping 1.0,
    # kernels-only decay, no evaluation override (the summary .md's "pre-logits = hidden" and
    # "evaluate at C=4" are common.py's and the S/32 file's, not this recipe's).
    "vmoe_b16_every2_i21k": {
        **PRETRAIN,
        # randaug(2,20) and mixup concentration 0.5, mixup_size 2.
        "model.name": "V-MoE-B/16",
        "model.moe.layers": "every-2",
        "dataset.name": "tfds:imagenet21k",
        "dataset.train_split": "full[102400:]",
        "dataset.eval_splits": ("full[:102400]",),
        "dataset.test_split": "",
        "batch_size": 4096,
        "pp.train": "decode(3)|inception_crop(224)|flip_lr|randaug(2, 20)|value_range(-1, 1)|"
        "onehot(21843)|mixup(0.5, groups={local_devices}, largest_first=True)",
        "model.representation_size": 0,
        "model.head_bias_init": -10.0,
        "model.moe.dropout_rate": 0.0,
        "optimizer.learning_rate": 8e-4,  # ('B', 16): 8e-4
        "optimizer.grad_clip_norm": 1.0,
        "eval.capacity_factor": 0.0,
    },
    "vmoe_b16_every2_i21k_ft_i1k_384": {
        **FINETUNE_I1K_384,
        "model.name": "V-MoE-B/16",
        "model.moe.layers": "every-2",
    },
}
# The release's architectures (common.get_vmoe_config), against our presets.
SIZES = {"V-MoE-S/32": (512, 8, 2048, 8, 32), "V-MoE-B/16": (768, 12, 3072, 12, 16)}
MOE_BLOCKS = {"V-MoE-S/32": (5, 7), "V-MoE-B/16": (1, 3, 5, 7, 9, 11)}  # Last 2 / Every 2


def test_every_paper_recipe_has_a_table():
    shipped = set(cfg.shipped_configs()) - {"digits_vmoe", "digits_vit"}
    assert shipped == set(RELEASE)


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_recipe_equals_the_release_field_by_field(name):
    config = cfg.load_config(name)
    differences = {
        path: (config_get(config, path, "<missing>"), expected)
        for path, expected in RELEASE[name].items()
        if config_get(config, path, "<missing>") != expected
    }
    assert differences == {}


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_a_recipe_sets_no_field_the_table_does_not_name(name):
    """Every field that differs from base_config is in the release table (or operational)."""
    flat = _flat(cfg.load_config(name).to_dict())
    base = _flat(base_config().to_dict())
    changed = {path for path, value in flat.items() if base.get(path, "<new>") != value}
    assert changed - set(RELEASE[name]) - OPERATIONAL == set()


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_recipe_model_is_the_releases_architecture(name):
    config = cfg.load_config(name)
    classes = 21_843 if name == "vmoe_b16_every2_i21k" else 1000
    model = setup_lib.build_model(config, num_classes=classes)
    sizes = (model.hidden_size, model.num_layers, model.mlp_dim, model.num_heads, model.patch_size)
    assert sizes == SIZES[config.model.name]
    assert model.moe_blocks() == MOE_BLOCKS[config.model.name]
    expected = RELEASE[name]
    assert model.head_bias_init == expected["model.head_bias_init"]
    assert model.representation_size == (expected["model.representation_size"] or None)
    assert model.moe.expert_init == "shared" and model.moe.dispatch_dtype == "bfloat16"
    assert model.moe.dropout_rate == expected["model.moe.dropout_rate"]
    assert model.dropout_rate == 0.0 and model.classifier == "token"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize(
    ("old", "new"),
    [("vmoe_s32_i1k", "vmoe_s32_last2_i1k"), ("vmoe_b16_i21k", "vmoe_b16_every2_i21k")],
)
def test_old_recipe_names_fail_naming_the_new_ones(old, new):
    with pytest.raises(cfg.ConfigError, match=rf"{old}.*renamed.*{new}, {new}_ft_i1k_384"):
        cfg.load_config(old)
