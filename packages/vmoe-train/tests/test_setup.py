"""The builders of a run's parts (vmoe_train.setup): the model, its routing groups, the dataset."""

from __future__ import annotations

import pytest
from ml_collections import ConfigDict

import vmoe_routing
from vmoe_train import config as cfg
from vmoe_train import setup as setup_lib
from vmoe_train.config.fields import EXPERT_INITS
from vmoe_train.configs.base import base_config
from vmoe_train.resume import ResumeConfigError, check_resume


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
    del older.model["head_bias_init"], older.model.moe["expert_init"]
    del older.model.moe["dropout_rate"]
    model = setup_lib.build_model(older, num_classes=10)
    assert model.classifier == "token" and model.head_bias_init == 0.0
    assert model.moe.expert_init == "independent" and model.moe.dropout_rate is None
    release = vmoe(
        "model.head_bias_init=-2.5", "model.moe.expert_init=shared", "model.moe.dropout_rate=0.2"
    )
    model = setup_lib.build_model(release, num_classes=10)
    assert model.head_bias_init == -2.5 and model.dropout_rate == 0.1
    assert model.moe.expert_init == "shared" and model.moe.dropout_rate == 0.2


def test_a_preset_changes_field_by_field_and_a_family_alone_takes_every_size():
    changed = vmoe("model.num_layers=2", "model.num_heads=2", "model.moe.layers=(1,)")
    model = setup_lib.build_model(changed, num_classes=10)
    sizes = (model.patch_size, model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim)
    assert sizes == (2, 64, 2, 2, 128) and model.moe_blocks() == (1,)  # V-MoE-Mu/2 otherwise
    sizes = {"patch_size": 4, "hidden_size": 24, "num_layers": 3, "num_heads": 3, "mlp_dim": 40}
    given = [f"model.{field}={size}" for field, size in sizes.items()]
    config = vmoe("model.name=V-MoE", *given)
    assert setup_lib.model_sizes(config.model) == sizes
    model = setup_lib.build_model(config, num_classes=10)
    assert model.hidden_size == 24 and model.moe.num_experts == 4 and model.moe_blocks() == (1,)
    assert setup_lib.build_model(vmoe("model.name=ViT", *given), num_classes=10).moe is None
    missing = r"missing \(integers >= 1\): model\.patch_size, model\.num_heads; or name a"
    with pytest.raises(ValueError, match=missing):
        setup_lib.model_sizes(vmoe("model.name=V-MoE", *given[1:3], given[4]).model)


def test_a_config_saved_before_the_size_fields_resumes_and_builds_the_same_model():
    current = vmoe()
    saved = cfg.config_to_json(current)
    for field in ("patch_size", "hidden_size", "num_layers", "num_heads"):
        del saved["model"][field]
    defaults = cfg.config_to_json(base_config())  # what the trainer's resume compares with
    assert check_resume(saved, cfg.config_to_json(current), defaults=defaults) == []
    old = setup_lib.build_model(cfg.config_from_json(saved), num_classes=10)
    assert old == setup_lib.build_model(current, num_classes=10)


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


def test_num_epochs_resolves_to_steps_over_the_train_split():
    config = vmoe("num_epochs=2.5", "num_steps=0", "batch_size=64", "optimizer.warmup_steps=10")
    dataset = setup_lib.open_dataset(config)
    assert setup_lib.num_train_steps(config, dataset) == 49  # ceil(2.5 x 1253 / 64 = 48.9)
    assert setup_lib.num_train_steps(vmoe("num_steps=7"), dataset) == 7
    older = cfg.config_to_json(vmoe("num_steps=7"))  # saved before num_epochs existed
    del older["num_epochs"]
    assert setup_lib.num_train_steps(cfg.config_from_json(older), dataset) == 7
    short = vmoe("num_epochs=0.01", "num_steps=0", "optimizer.warmup_steps=10")
    with pytest.raises(
        ValueError,
        match=r"num_epochs=0.01 of 1253 examples .* is 1 steps; .* >= optimizer.warmup_steps=10",
    ):
        setup_lib.num_train_steps(short, dataset)


def test_evaluation_capacity_is_the_override_or_the_routers_evaluation_capacity():
    def capacity(*overrides, override=None):
        model = setup_lib.build_model(vmoe(*overrides), num_classes=10)
        return setup_lib.evaluation_capacity(model, override)

    assert capacity() == 1.05  # V-MoE's default C
    assert capacity(override=4.0) == 4.0
    assert capacity("model.moe.router_options.eval_capacity_factor=2.0") == 2.0
    assert capacity("model.moe.router_options.capacity_factor=1.5") == 1.5
    if "soft" in vmoe_routing.available_routers():  # a plugin (the dev and CI venvs have it)
        assert capacity("model.moe.router=soft") is None  # no capacity to name
        assert capacity("model.moe.router=soft", override=4.0) is None  # nor to override
    dense = setup_lib.build_model(cfg.load_config("digits_vit"), num_classes=10)
    assert setup_lib.evaluation_capacity(dense, 4.0) is None


def test_the_expert_strategies_default_mesh_puts_whole_experts_on_each_device():
    def shape(devices, *overrides):
        return setup_lib.mesh_shape(vmoe("sharding.strategy=expert", *overrides), devices)

    assert shape(8, "model.moe.num_experts=8") == (1, 8)
    assert shape(32, "model.moe.num_experts=8") == (4, 8)  # the release's E=8 on a TPUv3-32
    assert shape(8, "model.moe.num_experts=32") == (1, 8)  # 4 experts per device
    assert shape(8, "model.moe.num_experts=6") == (4, 2)
    assert shape(8, "sharding.mesh_shape=(2, 4)") == (2, 4)  # given: kept
    assert setup_lib.mesh_shape(vmoe(), 8) == ()  # data: the strategy's default


def test_local_devices_in_pp_train_is_resolved_and_a_resume_on_other_devices_refused():
    spec = "decode|value_range(-1, 1)|onehot(10)|mixup(0.2, groups={local_devices})"
    config = vmoe(f"pp.train={spec}")
    run = setup_lib.with_local_devices(config)
    assert run.pp.train == spec.replace("{local_devices}", "1")  # one CPU device here
    assert config.pp.train == spec  # the config itself is left as given
    plain = vmoe()
    assert setup_lib.with_local_devices(plain) is plain
    # A run saved on 8 local devices does not resume silently with other mixup groups.
    saved = cfg.config_to_json(run)
    saved["pp"]["train"] = spec.replace("{local_devices}", "8")
    with pytest.raises(ResumeConfigError, match=r"pp.train: .*groups=8.* -> .*groups=1"):
        check_resume(saved, cfg.config_to_json(run))


def test_remat_reaches_the_model_and_its_choices_are_the_layers():
    import vmoe_layers

    assert cfg.REMAT == vmoe_layers.REMAT
    assert EXPERT_INITS == vmoe_layers.moe.EXPERT_INITS  # the config's choices are the layer's
    assert setup_lib.build_model(vmoe("model.remat=block"), num_classes=10).remat == "block"
    older = cfg.config_to_json(vmoe())  # saved before the field
    del older["model"]["remat"]
    assert setup_lib.build_model(cfg.config_from_json(older), num_classes=10).remat == "none"
