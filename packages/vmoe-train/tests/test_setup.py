"""The builders of a run's parts (vmoe_train.setup): the model, its routing groups, the dataset."""

from __future__ import annotations

from ml_collections import ConfigDict

from vmoe_train import config as cfg
from vmoe_train import setup as setup_lib


def vmoe(*overrides: str) -> ConfigDict:
    return cfg.apply_overrides(cfg.load_config("digits_vmoe"), list(overrides))


def test_build_model_follows_the_config():
    dense = setup_lib.build_model(cfg.load_config("digits_vit"), num_classes=10)
    assert dense.moe is None and dense.mlp_dim == 192
    config = vmoe("model.moe.expert_type=glu", "model.moe.router=bpr", "model.dtype=bfloat16")
    model = setup_lib.build_model(config, num_classes=10, group_size=136)
    assert model.mlp_dim == 128 and model.dropout_rate == 0.1
    assert model.moe.expert_type == "glu" and model.moe.router == "bpr"
    assert model.moe.group_size == 136 and model.moe.num_experts == 4
    assert model.dtype.__name__ == "bfloat16"
    assert setup_lib.routing_group_size(config, per_device_batch=64, tokens_per_image=17) == 8 * 17
    config = vmoe("model.moe.group_images=0")
    assert setup_lib.routing_group_size(config, per_device_batch=64, tokens_per_image=17) == 64 * 17


def test_build_model_takes_the_original_release_options():
    config = vmoe(
        "model.classifier=gap", "model.representation_size=32", "model.moe.dispatch_dtype=bfloat16"
    )
    assert cfg.validate_config(config) == []
    model = setup_lib.build_model(
        config, num_classes=10, group_size=128
    )  # 16 tokens: no class token
    assert model.classifier == "gap" and model.representation_size == 32
    assert model.moe.dispatch_dtype == "bfloat16"
    plain = setup_lib.build_model(vmoe(), num_classes=10)
    assert plain.representation_size is None and plain.moe.dispatch_dtype is None
    older = cfg.config_from_json(cfg.config_to_json(vmoe()))  # a config saved before them
    del older.model["classifier"], older.model["representation_size"]
    del older.model.moe["dispatch_dtype"]
    assert setup_lib.build_model(older, num_classes=10).classifier == "token"


def test_dataset_classes_restrict_and_relabel_the_dataset():
    config = cfg.apply_overrides(
        cfg.load_config("digits_vmoe"),
        ["dataset.classes=(7, 3)", "pp.train=decode|value_range(-1, 1)|onehot(2)"],
    )
    cfg.validate_config(config)
    dataset = setup_lib.open_dataset(config)
    assert (dataset.num_classes, dataset.class_names) == (2, ("7", "3"))
    digits = setup_lib.open_dataset(cfg.load_config("digits_vmoe"))
    expected = [{7: 0, 3: 1}[c] for c in digits.labels("test").tolist() if c in (7, 3)]
    assert dataset.labels("test").tolist() == expected


def test_eval_capacity_factor_is_the_configs_or_the_routers_own():
    assert setup_lib.eval_capacity_factor(vmoe()) is None  # 0: the routers' own
    assert setup_lib.eval_capacity_factor(vmoe("eval.capacity_factor=2")) == 2.0
    older = cfg.config_to_json(vmoe())  # a config saved before the field existed
    del older["eval"]["capacity_factor"]
    assert setup_lib.eval_capacity_factor(cfg.config_from_json(older)) is None
