"""Configs: loading by name and path, overrides, validation (every rule, all at once), JSON."""

from __future__ import annotations

import importlib
import json
import textwrap

import pytest
from ml_collections import ConfigDict

from vmoe_train import config as cfg
from vmoe_train.config import ConfigError


def vmoe(*overrides: str) -> ConfigDict:
    return cfg.apply_overrides(cfg.load_config("digits_vmoe"), list(overrides))


def only_problem(problems: list[str], field: str) -> str:
    """The one problem, checked to name `field` first."""
    assert len(problems) == 1, problems
    assert problems[0].startswith((f"{field}=", f"{field}:")), problems
    return problems[0]


# Loading --------------------------------------------------------------------------------------


def test_shipped_configs_name_their_first_docstring_line():
    shipped = cfg.shipped_configs()
    assert {"digits_vmoe", "digits_vit"} <= set(shipped)
    assert "base" not in shipped  # fields only, no get_config()
    for name, line in shipped.items():
        module = importlib.import_module(f"vmoe_train.configs.{name}")
        assert line and line == module.__doc__.strip().splitlines()[0]


OFFLINE = ("digits_vmoe", "digits_vit")  # the shipped configs whose data is embedded


@pytest.mark.parametrize("name", sorted(cfg.shipped_configs()))
def test_shipped_configs_are_valid(name):
    config = cfg.load_config(name)
    problems = cfg.validate_config(config, num_devices=1, num_processes=1)
    if name in OFFLINE:
        assert problems == []
        assert cfg.check_config(config, num_devices=1, num_processes=1) is config
    else:
        # The paper recipes need ImageNet prepared by the user: that is their only problem here.
        assert len(problems) == 1 and problems[0].startswith("dataset.name='tfds:imagenet")
        assert "not prepared" in problems[0]


def test_load_by_name_is_the_modules_config():
    from vmoe_train.configs import digits_vit

    assert cfg.load_config("digits_vit").to_dict() == digits_vit.get_config().to_dict()
    assert cfg.config_name("digits_vit") == "digits_vit"


def test_load_by_path(tmp_path):
    path = tmp_path / "my_run.py"
    path.write_text(
        textwrap.dedent(
            '''
            """My run: digits_vmoe with BPR."""
            from vmoe_train.configs.digits_vmoe import get_config as base

            def get_config():
                c = base()
                c.model.moe.router = "bpr"
                return c
            '''
        )
    )
    config = cfg.load_config(str(path))
    assert config.model.moe.router == "bpr"
    assert cfg.validate_config(config, num_devices=1) == []
    assert cfg.config_name(str(path)) == "my_run"


def test_unknown_name_lists_the_shipped_ones_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        cfg.load_config("digits_vmo")
    (problem,) = info.value.problems
    assert "did you mean 'digits_vmoe'?" in problem and "digits_vit" in problem


def test_bad_paths(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        cfg.load_config(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        cfg.load_config(str(tmp_path / "empty.py"))
    (tmp_path / "wrong.py").write_text("def get_config():\n    return 3\n")
    with pytest.raises(ConfigError, match="returned a int"):
        cfg.load_config(str(tmp_path / "wrong.py"))


# Overrides ------------------------------------------------------------------------------------


def test_overrides_convert_to_the_fields_type():
    base = cfg.load_config("digits_vmoe")
    config = cfg.apply_overrides(
        base,
        [
            "optimizer.learning_rate=1",  # int -> float
            "num_steps=1e3",  # integral float -> int
            "sharding.mesh_shape=[1]",  # list -> tuple
            "dataset.eval_splits=validation,test",  # text -> tuple of names
            "checkpoint.async_save=false",
            "log.callbacks=progress,jsonl",
            "log.profile_steps=(10, 5)",  # int or tuple
            "model.moe.router=bpr",  # plain text
            "model.name=V-MoE-Mu/4",  # not a literal: the text
            "optimizer.frozen=1",  # a number's text, for a text field
            "pp.eval='decode|value_range(0, 1)'",  # quoted
            "model.moe.layers=(1, 3)",  # str or tuple
            "optimizer.lr_multipliers=[['head', 10]]",
        ],
    )
    assert config.optimizer.learning_rate == 1.0
    assert isinstance(config.optimizer.learning_rate, float)
    assert config.num_steps == 1000 and isinstance(config.num_steps, int)
    assert config.sharding.mesh_shape == (1,)
    assert config.dataset.eval_splits == ("validation", "test")
    assert config.checkpoint.async_save is False
    assert config.log.callbacks == ("progress", "jsonl")
    assert config.log.profile_steps == (10, 5)
    assert config.model.moe.router == "bpr"
    assert config.model.name == "V-MoE-Mu/4"
    assert config.optimizer.frozen == "1"
    assert config.pp.eval == "decode|value_range(0, 1)"
    assert config.model.moe.layers == (1, 3)
    assert config.optimizer.lr_multipliers == (("head", 10),)
    assert base.model.moe.router == "top_k"  # the input is untouched
    assert cfg.validate_config(config, num_devices=1) == []


def test_overrides_from_a_mapping():
    config = cfg.apply_overrides(
        cfg.load_config("digits_vmoe"), {"batch_size": "32", "optimizer.b1": 0.8}
    )
    assert config.batch_size == 32 and config.optimizer.b1 == 0.8


def test_a_new_router_option_is_allowed():
    config = vmoe(
        "model.moe.router=bpr",
        "model.moe.router_options.priority_score=sum",
        "model.moe.router_options.k=1",
    )
    assert config.model.moe.router_options.to_dict() == {
        "k": 1,
        "priority_score": "sum",
    }
    assert cfg.validate_config(config, num_devices=1) == []


def test_router_options_replaced_by_a_dict():
    config = vmoe("model.moe.router_options={'k': 1}")
    assert config.model.moe.router_options.to_dict() == {"k": 1}


def test_unknown_key_names_it_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        vmoe("model.moe.ruoter=bpr")
    (problem,) = info.value.problems
    assert problem.startswith("model.moe.ruoter: unknown field (did you mean 'router'?)")
    assert "'num_experts'" in problem  # the fields at that level


def test_override_errors_are_all_collected():
    with pytest.raises(ConfigError) as info:
        vmoe(
            "batch_size=abc",
            "seed=1.5",
            "model.moe.num_experts=True",
            "modle.name=x",
            "model.moe=3",
            "optimizer.frozen.x=1",
            "no_equals_sign",
        )
    problems = info.value.problems
    assert len(problems) == 7, problems
    starts = [
        "'no_equals_sign'",
        "batch_size=abc: must be an integer",
        "seed=1.5: must be an integer",
        "model.moe.num_experts=True: must be an integer",
        "modle.name: unknown field (did you mean 'model'?)",
        "model.moe=3: is a group of fields",
        "optimizer.frozen.x=1: optimizer.frozen is a str value",
    ]
    for start in starts:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert str(info.value).startswith("7 problems in the config:\n  - ")


def test_config_error_message():
    error = ConfigError(["a=1: bad", "b: worse"])
    assert error.problems == ["a=1: bad", "b: worse"]
    assert str(error) == "2 problems in the config:\n  - a=1: bad\n  - b: worse"
    assert str(ConfigError(["a: bad"])).startswith("1 problem in the config:")
    assert isinstance(error, ValueError)


# Validation: one rule, one field --------------------------------------------------------------

RULES = [
    # (overrides, validate_config kwargs, the field reported)
    (["batch_size=0"], {}, "batch_size"),
    (["eval_batch_size=0"], {}, "eval_batch_size"),
    (["num_steps=0"], {}, "num_steps"),
    (["seed=-1"], {}, "seed"),
    (["optimizer.learning_rate=0"], {}, "optimizer.learning_rate"),
    (["optimizer.b1=1.0"], {}, "optimizer.b1"),
    (["optimizer.weight_decay=-1"], {}, "optimizer.weight_decay"),
    (["optimizer.end_lr_ratio=2"], {}, "optimizer.end_lr_ratio"),
    (["model.dropout_rate=1.0"], {}, "model.dropout_rate"),
    (["model.mlp_dim=-1"], {}, "model.mlp_dim"),
    (["model.representation_size=-1"], {}, "model.representation_size"),
    (["model.classifier=map"], {}, "model.classifier"),
    (["model.moe.dispatch_dtype=float16"], {}, "model.moe.dispatch_dtype"),
    (["loss.label_smoothing=1.0"], {}, "loss.label_smoothing"),
    (["eval.every_steps=-1"], {}, "eval.every_steps"),
    (["eval.capacity_factor=-1"], {}, "eval.capacity_factor"),
    (["checkpoint.every_steps=-1"], {}, "checkpoint.every_steps"),
    (["log.every_steps=-1"], {}, "log.every_steps"),
    (["checkpoint.keep=-1"], {}, "checkpoint.keep"),
    (["dataset.num_workers=-1"], {}, "dataset.num_workers"),
    (["dataset.cache=sometimes"], {}, "dataset.cache"),
    (["dataset.classes=(0, 12)"], {}, "dataset.classes"),
    (["dataset.classes=(1, 1)"], {}, "dataset.classes"),
    (["dataset.classes=(0, 1, 2, 3, 4)"], {}, "pp.train"),  # onehot(10) for 5 classes
    (["dataset.name=digitz"], {}, "dataset.name"),
    (["dataset.train_split=trian"], {}, "dataset.train_split"),
    (["dataset.eval_splits=validation,nope"], {}, "dataset.eval_splits[1]"),
    (["dataset.test_split=tset"], {}, "dataset.test_split"),
    (["dataset.eval_splits=validation,validation"], {}, "dataset.eval_splits"),
    (["model.name=ViT-Q/2"], {}, "model.name"),
    (["model.name=V-MoE-Mu/3"], {}, "model.name"),  # patch 3 does not divide 8x8
    (["model.name=V-MoE"], {}, "model.name"),  # a family alone: every size must be set
    (["model.patch_size=3"], {}, "model.patch_size"),
    (["model.hidden_size=-1"], {}, "model.hidden_size"),
    (["model.num_heads=3"], {}, "model.num_heads"),  # does not divide the preset's 64
    (["model.num_layers=2", "model.moe.layers=(1, 3)"], {}, "model.moe.layers"),
    (
        [
            "model.name=ViT",
            "model.patch_size=4",
            "model.hidden_size=24",
            "model.num_layers=3",
            "model.num_heads=3",
            "model.mlp_dim=40",
        ],
        {},
        None,
    ),
    (["model.dtype=float16"], {}, "model.dtype"),
    (["model.moe.router=tpo_k"], {}, "model.moe.router"),
    (["model.moe.router_options.foo=1"], {}, "model.moe.router_options"),
    (["model.moe.router_options.k=0"], {}, "model.moe.router_options.k"),
    (
        ["model.moe.router_options.capacity_factor=-1"],
        {},
        "model.moe.router_options.capacity_factor",
    ),
    (["model.moe.router_options.num_experts=8"], {}, "model.moe.router_options.num_experts"),
    (["model.moe.expert_type=glux"], {}, "model.moe.expert_type"),
    (["model.moe.num_experts=0"], {}, "model.moe.num_experts"),
    (["model.moe.layers=last-5"], {}, "model.moe.layers"),
    (["model.moe.layers=(0, 9)"], {}, "model.moe.layers"),
    (["model.moe.group_images=5"], {}, "model.moe.group_images"),
    (["model.moe.group_images=8"], {"num_devices": 16}, "model.moe.group_images"),
    (["model.moe.group_images=0", "eval_batch_size=96"], {}, "eval_batch_size"),
    (["model.moe.group_images=0", "eval_batch_size=192"], {"num_devices": 4}, None),
    (["sharding.strategy=dta"], {}, "sharding.strategy"),
    (["sharding.mesh_shape=(2,)"], {"num_devices": 1}, "sharding.mesh_shape"),
    (["sharding.mesh_shape=(1, 1)"], {"num_devices": 1}, "sharding.mesh_shape"),
    (["sharding.mesh_shape=(0,)"], {}, "sharding.mesh_shape"),
    # E=4 on 8 devices: the default mesh is (2, 4) (gcd(E, devices) on the expert axis).
    (["sharding.strategy=expert"], {"num_devices": 8, "num_processes": 1}, None),
    (
        ["sharding.strategy=expert", "sharding.mesh_shape=(1, 8)"],
        {"num_devices": 8, "num_processes": 1},
        "sharding.mesh_shape",
    ),
    (["optimizer.name=adamx"], {}, "optimizer.name"),
    (["optimizer.mu_dtype=float16"], {}, "optimizer.mu_dtype"),
    (["optimizer.nu_dtype=float16"], {}, "optimizer.nu_dtype"),
    (["optimizer.end_learning_rate=1.0"], {}, "optimizer.end_learning_rate"),  # above the peak
    (["num_epochs=-1"], {}, "num_epochs"),
    (["num_epochs=2"], {}, "num_steps"),  # num_steps must then be 0
    (["num_epochs=2", "num_steps=0"], {}, None),
    (["num_steps=0"], {}, "num_steps"),
    (["model.moe.expert_init=split"], {}, "model.moe.expert_init"),
    (["model.moe.dropout_rate=1.0"], {}, "model.moe.dropout_rate"),
    (["model.moe.dropout_rate=-0.5"], {}, "model.moe.dropout_rate"),
    (["model.moe.dropout_rate=0.2", "model.moe.expert_init=shared"], {}, None),
    (["optimizer.schedule=cos"], {}, "optimizer.schedule"),
    (["optimizer.warmup_steps=9000"], {}, "optimizer.warmup_steps"),
    (["optimizer.frozen=("], {}, "optimizer.frozen"),
    (["optimizer.weight_decay_on=["], {}, "optimizer.weight_decay_on"),
    (["optimizer.lr_multipliers=(('(', 2.0),)"], {}, "optimizer.lr_multipliers[0]"),
    (["optimizer.lr_multipliers=(('head', -2.0),)"], {}, "optimizer.lr_multipliers[0]"),
    (["optimizer.lr_multipliers=(('head',),)"], {}, "optimizer.lr_multipliers[0]"),
    (["loss.kind=hinge"], {}, "loss.kind"),
    (["batch_size=60"], {"num_devices": 8}, "batch_size"),
    (["eval_batch_size=100"], {"num_devices": 8}, "eval_batch_size"),
    (["eval_batch_size=100"], {"num_processes": 8}, "eval_batch_size"),
    (["batch_size=66", "distributed.num_processes=4"], {}, "batch_size"),
    (["distributed.process_id=1"], {}, "distributed.process_id"),
    (["distributed.num_processes=0"], {}, "distributed.num_processes"),
    (["distributed.coordinator_address=nohost"], {}, "distributed.coordinator_address"),
    (["distributed.coordinator_address=host:99999"], {}, "distributed.coordinator_address"),
    (["distributed.coordinator_address=auto"], {}, None),  # the cluster's
    (["log.callbacks=progress,jsnol"], {}, "log.callbacks[1]"),
    (["log.profile_steps=-1"], {}, "log.profile_steps"),
    (["log.profile_steps=(3, 0)"], {}, "log.profile_steps"),
    (["log.profile_steps=(3, 2)"], {}, None),
    (["checkpoint.keep_best=valid/accuracy"], {}, "checkpoint.keep_best"),
    (["checkpoint.keep_best=validation/f1"], {}, "checkpoint.keep_best"),
    (["finetune.init_from=/nonexistent/vmoe/run"], {}, "finetune.init_from"),
    (["finetune.step=-2"], {}, "finetune.step"),
    (["pp.train=decode|rezise(8)|onehot(10)"], {}, "pp.train"),
    (["pp.train=decode|value_range(-1, 1)|onehot(11)"], {}, "pp.train"),
    (["pp.train=decode|value_range(-1, 1)|keep('image')"], {}, "pp.train"),
    (["pp.eval=decode|value_range(-1, 1)|onehot(10)|mixup"], {}, "pp.eval"),
    (["pp.eval=decode|resize(16)|value_range(-1, 1)"], {}, "pp.eval"),  # train makes 8x8
    (["pp.eval=decode|keep('image')"], {}, "pp.eval"),  # no label to score
]


@pytest.mark.parametrize(("overrides", "kwargs", "field"), RULES, ids=[r[0][0] for r in RULES])
def test_each_rule_names_its_field(overrides, kwargs, field):
    problems = cfg.validate_config(vmoe(*overrides), **kwargs)
    if field is None:  # a valid value next to the invalid ones
        assert problems == []
    else:
        only_problem(problems, field)


def test_k_above_e_message():
    (problem,) = cfg.validate_config(vmoe("model.moe.router_options.k=5"))
    assert problem == "model.moe.router_options.k=5: must be <= model.moe.num_experts=4"


def test_a_family_alone_names_every_missing_size_at_once():
    problem = only_problem(
        cfg.validate_config(vmoe("model.name=V-MoE", "model.hidden_size=48")), "model.name"
    )
    assert problem == (
        "model.name='V-MoE': names no preset, so every size must be given; missing (integers "
        ">= 1): model.patch_size, model.num_layers, model.num_heads, model.mlp_dim; or name a "
        "preset, e.g. V-MoE-S/32"
    )


def test_heads_must_divide_the_hidden_size_a_preset_changed_field_by_field_too():
    problem = only_problem(cfg.validate_config(vmoe("model.hidden_size=30")), "model.num_heads")
    assert problem == (
        "model.num_heads=4: must divide model.hidden_size=30 (the preset V-MoE-Mu/2's; set "
        "model.num_heads); allowed: [1, 2, 3, 5, 6, 10, 15, 30]"
    )
    assert cfg.validate_config(vmoe("model.hidden_size=30", "model.num_heads=5")) == []


def test_group_images_message_counts_the_tokens():
    problem = only_problem(
        cfg.validate_config(vmoe("model.moe.group_images=5"), num_devices=1),
        "model.moe.group_images",
    )
    # 8x8 digits in 2x2 patches: 16 tokens + the class token.
    assert "5 x 17 = 85 tokens" in problem and "64 x 17 = 1088 tokens" in problem
    gap = vmoe("model.moe.group_images=5", "model.classifier=gap")  # no class token
    problem = only_problem(cfg.validate_config(gap, num_devices=1), "model.moe.group_images")
    assert "5 x 16 = 80 tokens" in problem and "64 x 16 = 1024 tokens" in problem


def test_tfds_not_prepared_is_the_dataset_problem(tmp_path):
    config = vmoe("dataset.name=tfds:surely_not_a_dataset_here", f"dataset.data_dir={tmp_path}")
    problem = only_problem(cfg.validate_config(config), "dataset.name")
    assert "surely_not_a_dataset_here" in problem


def _save_steps(directory, steps):
    """Real (tiny) checkpoints at `steps` under `directory`."""
    import jax.numpy as jnp

    from vmoe_train import Checkpointer
    from vmoe_train.state import TrainState

    state = TrainState(jnp.int32(0), {"w": jnp.ones((2,))}, (), jnp.zeros((2,), jnp.uint32))
    with Checkpointer(directory, every_steps=1, keep=0, async_save=False) as ckpt:
        for step in steps:
            ckpt.save(step, state, data_state={}, config={})


def test_finetune_needs_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    problem = only_problem(
        cfg.validate_config(vmoe(f"finetune.init_from={run}")), "finetune.init_from"
    )
    assert "holds no checkpoint" in problem
    _save_steps(run / "checkpoints", (100, 200))
    (run / "checkpoints" / "300.orbax-checkpoint-tmp-1").mkdir()  # never committed
    (run / "checkpoints" / "300").mkdir()  # no items: not a checkpoint
    # The trainer's own discovery: a run, its checkpoints/ or one step directory.
    for path in (run, run / "checkpoints", run / "checkpoints" / "100"):
        assert cfg.validate_config(vmoe(f"finetune.init_from={path}")) == [], path
    assert cfg.validate_config(vmoe(f"finetune.init_from={run}", "finetune.step=200")) == []
    problem = only_problem(
        cfg.validate_config(vmoe(f"finetune.init_from={run}", "finetune.step=150")),
        "finetune.step",
    )
    assert "[100, 200]" in problem
    step_dir = run / "checkpoints" / "100"
    problem = only_problem(
        cfg.validate_config(vmoe(f"finetune.init_from={step_dir}", "finetune.step=200")),
        "finetune.step",
    )
    assert "differs from the step finetune.init_from names" in problem


def test_checkpoint_keep_zero_keeps_all_and_modes_and_allowed_changes_are_checked():
    assert cfg.validate_config(vmoe("checkpoint.keep=0")) == []  # the Checkpointer's "all"
    only_problem(cfg.validate_config(vmoe("checkpoint.keep=-1")), "checkpoint.keep")
    assert cfg.validate_config(vmoe("checkpoint.keep_best_mode=min")) == []
    only_problem(
        cfg.validate_config(vmoe("checkpoint.keep_best_mode=up")), "checkpoint.keep_best_mode"
    )
    ok = vmoe("resume.allow_changes=num_steps,optimizer,model.moe.num_experts")
    assert cfg.validate_config(ok) == []
    problem = only_problem(
        cfg.validate_config(vmoe("resume.allow_changes=num_step")), "resume.allow_changes"
    )
    assert "'num_step' is not a config field or group" in problem


def test_keep_best_accepts_an_eval_split_metric():
    assert cfg.validate_config(vmoe("checkpoint.keep_best=validation/loss")) == []
    assert cfg.validate_config(vmoe("checkpoint.keep_best=validation/accuracy")) == []


def test_mesh_shape_must_match_the_devices():
    config = vmoe("sharding.strategy=expert", "sharding.mesh_shape=(2, 4)")
    assert cfg.validate_config(config, num_devices=8) == []
    only_problem(cfg.validate_config(config, num_devices=4), "sharding.mesh_shape")
    assert cfg.validate_config(config) == []  # devices unknown: not checked


def test_a_dense_model_ignores_the_moe_fields():
    config = cfg.apply_overrides(
        cfg.load_config("digits_vit"),
        ["model.moe.router=nope", "model.moe.group_images=5", "model.moe.num_experts=0"],
    )
    assert cfg.validate_config(config, num_devices=1) == []


def test_unknown_missing_and_mistyped_fields_of_a_config_file():
    config = cfg.load_config("digits_vmoe")
    config.optimizer.learnig_rate = 0.1
    del config.loss["label_smoothing"]
    del config["batch_size"]
    config.batch_size = "64"  # past ml_collections' type check
    problems = cfg.validate_config(config)
    assert len(problems) == 3, problems
    assert any(
        p.startswith("optimizer.learnig_rate: unknown field (did you mean 'learning_rate'?)")
        for p in problems
    )
    assert any(p.startswith("loss.label_smoothing: missing") for p in problems)
    assert any(p.startswith("batch_size='64': must be an integer") for p in problems)


def test_every_bad_field_is_reported_at_once(tmp_path):
    config = vmoe(
        "model.moe.router_options.k=5",
        "batch_size=60",
        "model.moe.router=tpo_k",
        "optimizer.name=adamx",
        "dataset.name=digitz",
        "optimizer.learning_rate=-1",
        "checkpoint.keep_best=valid/accuracy",
        f"finetune.init_from={tmp_path / 'nope'}",
        "model.moe.expert_type=glux",
        "sharding.strategy=dta",
    )
    with pytest.raises(ConfigError) as info:
        cfg.check_config(config, num_devices=8, num_processes=1)
    fields = [
        "batch_size",
        "model.moe.router",  # an unknown router: its options are not checked
        "optimizer.name",
        "dataset.name",
        "optimizer.learning_rate",
        "checkpoint.keep_best",
        "finetune.init_from",
        "model.moe.expert_type",
        "sharding.strategy",
    ]
    problems = info.value.problems
    assert len(problems) == len(fields), problems
    for field in fields:
        assert any(p.startswith(f"{field}=") for p in problems), (field, problems)
    assert str(info.value).startswith(f"{len(fields)} problems in the config:")


def test_num_processes_defaults_to_the_configs():
    config = vmoe("distributed.num_processes=3", "distributed.coordinator_address=h:1234")
    problems = cfg.validate_config(config)
    assert [p.split(":")[0] for p in problems] == ["batch_size=64", "eval_batch_size=128"]
    assert cfg.validate_config(config, num_processes=1) == []


# JSON -----------------------------------------------------------------------------------------


def test_json_round_trip():
    config = vmoe("optimizer.lr_multipliers=(('head', 10.0),)", "model.moe.layers=(1, 3)")
    data = cfg.config_to_json(config)
    text = json.dumps(data)  # plain JSON data
    assert data["dataset"]["eval_splits"] == ["validation"]
    assert data["optimizer"]["lr_multipliers"] == [["head", 10.0]]
    for restored in (cfg.config_from_json(json.loads(text)), cfg.config_from_json(text)):
        assert isinstance(restored, ConfigDict)
        assert restored.to_dict() == config.to_dict()
        assert cfg.validate_config(restored, num_devices=1) == []


def test_json_refuses_what_is_not_data():
    config = vmoe()
    del config["seed"]
    config.seed = object()
    with pytest.raises(TypeError, match="seed"):
        cfg.config_to_json(config)


@pytest.mark.parametrize(
    ("field", "registry_of"),
    [
        ("model.moe.router", lambda: __import__("vmoe_routing").ROUTERS),
        ("model.moe.expert_type", lambda: __import__("vmoe_layers").EXPERT_TYPES),
    ],
)
def test_a_plugin_name_not_installed_names_the_package_to_install(monkeypatch, field, registry_of):
    # A name of a repository plugin whose package is not installed (here a made-up one, so the
    # test holds whatever plugins this environment has; integration/ uninstalls a real one).
    registry = registry_of()
    monkeypatch.setitem(registry.known, "not_here", "vmoe-plugin-not-here")
    problems = cfg.validate_config(vmoe(f"{field}=not_here"))
    assert len(problems) == 1 and problems[0].startswith(f"{field}='not_here': ")
    assert (
        "comes with the plugin package vmoe-plugin-not-here, which is not installed: "
        in (problems[0])
    )
    assert "pip install vmoe-plugin-not-here; installed: [" in problems[0]


def test_a_layer_variant_not_installed_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(__import__("vmoe_layers").VARIANTS.known, "not_here", "vmoe-moe-not-here")
    problems = cfg.validate_config(vmoe("model.moe.variants.not_here.size=2"))
    assert len(problems) == 1 and problems[0].startswith("model.moe.variants.not_here: ")
    assert "pip install vmoe-moe-not-here; installed: [" in problems[0]


def test_layer_variant_options_are_checked_against_the_model(monkeypatch):
    """A variant's own options, and the layer shape it makes from the model's sizes."""

    class Halve:
        def __init__(self, m: int = 2):
            self.m = m

        def configure(self, shape):
            if shape.mlp_dim % self.m:
                raise ValueError(f"m={self.m} must divide mlp_dim={shape.mlp_dim}")
            return shape.replace(mlp_dim=shape.mlp_dim // self.m)

    class Plugin:
        @__import__("vmoe_plugins").hookimpl
        def vmoe_moe_variants(self):
            return {"halve_for_test": Halve}

    plugins = __import__("vmoe_plugins")
    name = plugins.register_plugin(Plugin(), name="halve-for-test")
    try:
        assert cfg.validate_config(vmoe("model.moe.variants.halve_for_test.m=4")) == []
        problems = cfg.validate_config(vmoe("model.moe.variants.halve_for_test.m=3"))
        assert problems and "m=3 must divide mlp_dim=128" in problems[0]
        problems = cfg.validate_config(vmoe("model.moe.variants.halve_for_test.size=3"))
        assert problems[0].startswith("model.moe.variants.halve_for_test: ")
    finally:
        plugins.unregister_plugin(name)


def _callbacks_installed(monkeypatch, evaluators: bool) -> None:
    """The callback registry as if vmoe-eval (its "evaluators" callback) were installed or not,
    whatever this environment has."""
    from vmoe_plugins.registry import _Entry
    from vmoe_train import callbacks

    entries = {k: v for k, v in callbacks.CALLBACKS._entries().items() if k != "evaluators"}
    if evaluators:
        entries["evaluators"] = _Entry(object, "vmoe-eval (test)")
    monkeypatch.setattr(callbacks.CALLBACKS, "_entries", lambda: entries)


def test_eval_evaluators_without_vmoe_eval_names_the_package_to_install(monkeypatch):
    _callbacks_installed(monkeypatch, evaluators=False)
    problem = only_problem(
        cfg.validate_config(vmoe("eval.evaluators=('accuracy',)")), "eval.evaluators"
    )
    assert "through the callback 'evaluators'" in problem
    assert "pip install vmoe-eval" in problem
    assert cfg.validate_config(vmoe("eval.evaluators=()")) == []
    problem = only_problem(
        cfg.validate_config(vmoe("log.callbacks=('jsonl', 'evaluators')")), "log.callbacks[1]"
    )
    assert "pip install vmoe-eval" in problem


def test_eval_evaluators_with_vmoe_eval_installed_is_valid(monkeypatch):
    _callbacks_installed(monkeypatch, evaluators=True)
    assert cfg.validate_config(vmoe("eval.evaluators=('accuracy',)", "log.callbacks=()")) == []
