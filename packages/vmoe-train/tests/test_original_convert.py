"""`vmoe-train convert`: an original checkpoint becomes a run that fine-tuning starts from."""

from __future__ import annotations

import contextlib
import io

import jax
import numpy as np
import original_reference as reference
import pytest

from vmoe_train import checkpoints, cli, trainer
from vmoe_train import setup as setup_lib
from vmoe_train.config import apply_overrides, config_from_json
from vmoe_train.original import export_run, params_from_original, read_checkpoint, write_checkpoint

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
    assert "V-MoE-Mu/2 (4 experts in blocks [1, 3]; token classifier; 10 classes)" in out
    assert f"--config.finetune.init_from={workdir}" in out
    params = checkpoints.restore_params(workdir / "checkpoints", step=0)
    jax.tree.map(np.testing.assert_array_equal, params, params_from_original(tree))
    config = config_from_json(checkpoints.read_config(workdir / "checkpoints"))
    assert config.model.name == "V-MoE-Mu/2" and config.model.representation_size == 16
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
    assert cli.main(["convert", "--help"]) == 0
    assert "usage: vmoe-train convert CHECKPOINT" in capsys.readouterr().out
