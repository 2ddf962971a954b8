"""`vmoe-train convert`: an original checkpoint becomes a run that fine-tuning starts from;
`vmoe-train export`: a run's parameters become an original checkpoint, and convert back bit for
bit."""

from __future__ import annotations

import contextlib
import io

import jax
import numpy as np
import optax
import original_reference as reference
import pytest

from vmoe_train import checkpoints, cli, steps, trainer
from vmoe_train import setup as setup_lib
from vmoe_train.config import (
    ConfigError,
    apply_overrides,
    config_from_json,
    config_to_json,
    load_config,
)
from vmoe_train.original import (
    converted_config,
    export_run,
    infer_architecture,
    params_from_original,
    params_to_original,
    read_checkpoint,
    read_index,
    write_checkpoint,
)
from vmoe_train.original.mapping import flatten

MU = {"hidden": 64, "layers": 4, "heads": 4, "mlp": 128, "moe_blocks": (1, 3)}


@pytest.fixture(scope="module")
def tree():
    return reference.original_tree(np.random.default_rng(0), **MU)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tree):
    """(workdir, stdout) of `vmoe-train convert` on the tree, written in 2 shards."""
    root = tmp_path_factory.mktemp("convert")
    write_checkpoint(root / "orig/ckpt", tree, num_shards=2, split=lambda p: "/Moe/Mlp/" in p)
    workdir = root / "run"
    argv = ["convert", str(root / "orig/ckpt.index"), f"--workdir={workdir}"]
    argv += ["--config=digits_vmoe", "--config.num_steps=3", "--config.optimizer.warmup_steps=1"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return workdir, out.getvalue()


def test_convert_writes_a_run_with_the_parameters_and_the_release_settings(converted, tree):
    workdir, out = converted
    assert (
        "V-MoE (patch 2, hidden 64, 4 blocks, 4 heads, MLP 128; 4 experts in blocks [1, 3]; "
        "token classifier; 10 classes)"
    ) in out
    assert f"--config.finetune.init_from={workdir}" in out
    params = checkpoints.restore_params(workdir / "checkpoints", step=0)
    jax.tree.map(np.testing.assert_array_equal, params, params_from_original(tree))
    config = config_from_json(checkpoints.read_config(workdir / "checkpoints"))
    sizes = [config.model[f] for f in ("patch_size", "hidden_size", "num_layers", "num_heads")]
    assert config.model.name == "V-MoE" and sizes == [2, 64, 4, 4]
    assert config.model.mlp_dim == 128 and config.model.representation_size == 16
    assert config.model.moe.layers == "every-2" and config.model.moe.group_images == 8
    assert config.model.moe.router_options.capacity_multiple_of == 4
    assert config.model.moe.router_options.eval_capacity_factor == 4.0
    assert config.model.moe.dispatch_dtype == "bfloat16" and config.num_steps == 3


def test_fine_tuning_starts_from_the_converted_run(converted, tree, tmp_path):
    workdir, _ = converted
    config = config_from_json(checkpoints.read_config(workdir / "checkpoints"))
    config = apply_overrides(config, [f"finetune.init_from={workdir}", "finetune.new_head=False"])
    setup = setup_lib.build(config)
    with checkpoints.Checkpointer(tmp_path / "ft", every_steps=0, keep=0) as empty:
        state, _, step, how = trainer.initial_state(setup, empty)
    assert step == 0 and how == f"fine-tuning from {workdir / 'checkpoints'}"
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(state.params), params_from_original(tree)
    )


def test_our_export_of_the_run_reads_back_as_the_original(converted, tree, tmp_path):
    workdir, _ = converted
    export_run(workdir, tmp_path / "back", num_shards=2)
    back = read_checkpoint(tmp_path / "back")
    assert back.keys() == tree.keys()
    for path, array in tree.items():
        np.testing.assert_array_equal(back[path], array, err_msg=path)


def test_a_checkpoint_that_does_not_fit_is_reported_by_path_at_once(tree, tmp_path, capsys):
    broken = dict(tree)
    del broken["Encoder/encoderblock_2/LayerNorm_1/bias"]
    broken["Encoder/encoderblock_1/Moe/Router/dense/bias"] = np.zeros(4, np.float32)
    broken["Encoder/encoderblock_0/Mlp/Dense_1/kernel"] = np.zeros((128, 60), np.float32)
    write_checkpoint(tmp_path / "ckpt", broken)
    argv = ["convert", str(tmp_path / "ckpt"), f"--workdir={tmp_path / 'run'}"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "missing in the checkpoint: Encoder/encoderblock_2/LayerNorm_1/bias" in err
    assert "not in the model: Encoder/encoderblock_1/Moe/Router/dense/bias" in err
    assert (
        "shape mismatch: Encoder/encoderblock_0/Mlp/Dense_1/kernel: checkpoint (128, 60) vs "
        "model (128, 64)"
    ) in err
    assert not (tmp_path / "run/checkpoints").exists() or not any(
        (tmp_path / "run/checkpoints").iterdir()
    )


def test_a_head_of_other_classes_says_which_config_to_use(tmp_path, capsys):
    tree = reference.original_tree(np.random.default_rng(0), classes=1000, **MU)
    write_checkpoint(tmp_path / "ckpt", tree)
    assert cli.main(["convert", str(tmp_path / "ckpt"), f"--workdir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert "shape mismatch: head/kernel: checkpoint (16, 1000) vs model (16, 10)" in err
    assert "the checkpoint's head has 1000 classes, dataset 'digits' has 10" in err


def test_usage_and_config_errors(tree, tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt", tree)
    assert cli.main(["convert", str(tmp_path / "ckpt")]) == 2
    assert "convert needs --workdir=DIR" in capsys.readouterr().err
    assert cli.main(["convert", f"--workdir={tmp_path}"]) == 2
    assert "convert takes one CHECKPOINT; got none" in capsys.readouterr().err
    argv = ["convert", str(tmp_path / "ckpt"), f"--workdir={tmp_path / 'run'}"]
    assert cli.main([*argv, "--config.model.moe.dispatch_dtype=float16"]) == 2
    assert "model.moe.dispatch_dtype='float16': unknown dispatch dtype" in capsys.readouterr().err
    assert cli.main([*argv, "--config.model.num_heads=2"]) == 2
    assert "model.num_heads=2: the checkpoint's is 4 (read from " in capsys.readouterr().err
    assert cli.main(["convert", "--help"]) == 0
    assert "usage: vmoe-train convert CHECKPOINT" in capsys.readouterr().out


def test_model_fields_given_explicitly_must_agree_with_the_checkpoint(tree):
    arch = infer_architecture({path: a.shape for path, a in tree.items()})
    base = load_config("digits_vmoe")
    # The checkpoint's values, and fields that are not its architecture, may be given.
    same = ["model.num_heads=4", "model.moe.layers=(1, 3)", "model.dtype=bfloat16"]
    assert converted_config(arch, base, same).model.dtype == "bfloat16"
    # A size the config file sets, and architecture fields the overrides change: all at once.
    base = apply_overrides(base, ["model.hidden_size=32"])
    overrides = ["model.num_heads=2", "model.moe.num_experts=8", "model.moe.layers=last-1"]
    with pytest.raises(ConfigError) as error:
        converted_config(arch, base, overrides)
    leave = "leave the field out to take the checkpoint's"
    assert error.value.problems == [
        "model.hidden_size=32: the checkpoint's is 64 (read from embedding/kernel [P, P, C, D]); "
        + leave,
        "model.num_heads=2: the checkpoint's is 4 (read from SelfAttention/query/kernel "
        "[D, heads, D / heads]); " + leave,
        "model.moe.num_experts=8: the checkpoint's is 4 (read from Moe/Router/dense/kernel "
        "[D, E]); " + leave,
        "model.moe.layers='last-1': the checkpoint's is (1, 3) (read from the blocks with Moe/ "
        "arrays); " + leave,
    ]


# Export ---------------------------------------------------------------------------------------

# A V-MoE of no preset's size: hidden 24 in 3 heads, 2 blocks, MLP 40, patch 4, 4 experts on
# block 1, a representation layer.
FRESH = [
    "model.name=V-MoE",
    "model.patch_size=4",
    "model.hidden_size=24",
    "model.num_layers=2",
    "model.num_heads=3",
    "model.mlp_dim=40",
    "model.moe.layers=(1,)",
    "model.representation_size=8",
]


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """(workdir, {step: params}) of a run of the FRESH model saved at steps 1 and 2, with
    random parameters (drawn in NumPy from the model's shapes: no compilation)."""
    config = apply_overrides(load_config("digits_vmoe"), FRESH)
    model = setup_lib.build_model(config, num_classes=10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    workdir = tmp_path_factory.mktemp("fresh")
    params = {}
    with checkpoints.Checkpointer(workdir / "checkpoints", every_steps=0, keep=0) as writer:
        for step in (1, 2):
            rng = np.random.default_rng(step)
            params[step] = jax.tree.map(
                lambda s, rng=rng: rng.standard_normal(s.shape).astype(s.dtype), shapes["params"]
            )
            state = steps.state_from_params(params[step], optax.sgd(0.1), jax.random.key(0))
            writer.save(step, state, data_state={}, config=config_to_json(config), force=True)
    return workdir, params


def test_export_then_convert_gives_back_every_array_bit_for_bit(fresh_run, tmp_path, capsys):
    workdir, params = fresh_run
    prefix = tmp_path / "orig/ckpt"
    assert cli.main(["export", str(workdir), str(prefix), "--step=1", "--shards", "2"]) == 0
    assert f"step 1 of {workdir} -> {prefix}.index and 2 data shard(s)" in capsys.readouterr().out
    entries, count = read_index(prefix)
    assert count == 2 and entries["Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"].shards == (0, 1)
    assert cli.main(["convert", str(prefix), f"--workdir={tmp_path / 'back'}"]) == 0
    back = flatten(checkpoints.restore_params(tmp_path / "back/checkpoints"))
    ours = flatten(params[1])
    assert back.keys() == ours.keys()
    for path, array in ours.items():
        assert back[path].dtype == array.dtype, path
        assert back[path].tobytes() == array.tobytes(), path
    model = config_from_json(checkpoints.read_config(tmp_path / "back/checkpoints")).model
    sizes = (model.patch_size, model.hidden_size, model.num_layers, model.num_heads)
    assert model.name == "V-MoE" and sizes == (4, 24, 2, 3) and model.mlp_dim == 40
    assert model.moe.layers == "every-2" and model.representation_size == 8  # (1,) in 2 blocks


def test_export_takes_the_latest_step_by_default(fresh_run, tmp_path):
    workdir, params = fresh_run
    assert cli.main(["export", str(workdir / "checkpoints"), str(tmp_path / "latest")]) == 0
    arrays = read_checkpoint(tmp_path / "latest")
    expected = params_to_original(params[2])
    assert arrays.keys() == expected.keys()
    for path, array in expected.items():
        assert arrays[path].tobytes() == np.asarray(array).tobytes(), path


def test_export_errors_name_the_steps_and_the_files_it_would_overwrite(fresh_run, tmp_path, capsys):
    workdir, _ = fresh_run
    prefix = tmp_path / "ckpt"
    assert cli.main(["export", str(workdir), str(prefix), "--step=3"]) == 1
    assert "has no checkpoint of step 3; its steps: [1, 2]" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "nope"), str(prefix)]) == 1
    assert "no run or checkpoint at" in capsys.readouterr().err
    other = tmp_path / "ckpt.data-00000-of-00003"  # a shard of another checkpoint there
    other.write_bytes(b"theirs")
    assert cli.main(["export", str(workdir), str(prefix)]) == 1
    err = capsys.readouterr().err
    assert f"a checkpoint {str(prefix)!r} exists, not overwritten: [{str(other)!r}]" in err
    assert other.read_bytes() == b"theirs" and not (tmp_path / "ckpt.index").exists()
    assert cli.main(["export", str(workdir)]) == 2
    assert "export takes RUN and PREFIX" in capsys.readouterr().err
    assert cli.main(["export", str(workdir), str(prefix), "--shards=0"]) == 2
    assert "--shards='0' must be an integer >= 1" in capsys.readouterr().err
    assert cli.main(["export", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: vmoe-train export RUN PREFIX")
