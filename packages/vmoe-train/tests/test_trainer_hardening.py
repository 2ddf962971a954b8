"""The trainer keeps what it should and resumes only what it resumed: keep_best through
`train()`, resume refusing a changed trajectory, resume restoring into abstract shapes,
fine-tuning from a step directory, callbacks and checkpoints closed on a crash. In process, a
tiny V-MoE on the embedded digits (12 steps, checkpoints every 4)."""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp
import pytest
from train_worker import tiny_config

import vmoe_train
from vmoe_train import checkpoints, steps
from vmoe_train.callbacks import Callback
from vmoe_train.resume import ResumeConfigError


def _config(*overrides):
    return tiny_config(["num_steps=12", "eval.every_steps=6", *overrides])


def _jsonl(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


KEEP_WORST = (
    "checkpoint.keep=1",
    "checkpoint.keep_best=validation/loss",
    "checkpoint.keep_best_mode=max",  # stated: the *largest* loss is "best" here
)


@pytest.fixture(scope="module")
def run_12(tmp_path_factory):
    """12 steps, checkpoints at 4, 8, 12, evaluations every 6 steps; keep=1 and keep_best by
    the largest validation loss: every checkpoint step is evaluated too, and the newest and
    the worst checkpoints survive."""
    workdir = tmp_path_factory.mktemp("run12")
    vmoe_train.train(_config(*KEEP_WORST), workdir)
    return workdir


def test_keep_best_uses_each_checkpoints_own_metrics_and_the_stated_mode(run_12):
    evaluated = {r["step"]: r["validation/loss"] for r in _jsonl(run_12) if "validation/loss" in r}
    assert sorted(evaluated) == [4, 6, 8, 12]  # the eval cadence (6) and every checkpoint
    worst = max((4, 8, 12), key=evaluated.get)
    assert worst != 12  # the loss went down: the test sees the mode
    kept = vmoe_train.Checkpointer(run_12 / "checkpoints", every_steps=0, keep=0)
    assert kept.steps() == [worst, 12]
    kept.close()
    manager = ocp.CheckpointManager(run_12 / "checkpoints")
    for step in (worst, 12):
        assert manager.metrics(step)["validation/loss"] == pytest.approx(evaluated[step])
    manager.close()


@pytest.mark.parametrize(
    ("override", "line", "accept"),
    [
        ("num_steps=16", "num_steps: 12 (saved) -> 16 (now)", "num_steps"),
        ("model.moe.num_experts=2", "model.moe.num_experts: 4 (saved) -> 2 (now)", "model.moe."),
        ("optimizer.learning_rate=0.1", "optimizer.learning_rate: 0.005 (saved) -> 0.1", "opt"),
    ],
)
def test_resume_with_a_changed_trajectory_is_refused_naming_the_override(
    run_12, override, line, accept
):
    with pytest.raises(ResumeConfigError) as info:
        vmoe_train.train(_config(override), run_12)
    message = str(info.value)
    assert line in message
    assert f"--config.resume.allow_changes={accept}" in message
    assert len([x for x in message.splitlines() if "(saved) ->" in x]) == 1  # only what differs


def test_resume_accepts_a_change_on_purpose_and_notes_harmless_ones(run_12, tmp_path, capsys):
    workdir = tmp_path / "resumed"
    import shutil

    shutil.copytree(run_12, workdir)
    summary = vmoe_train.train(
        _config(
            "num_steps=16",
            "resume.allow_changes=num_steps",
            "log.every_steps=4",
            *KEEP_WORST,
        ),
        workdir,
    )
    assert summary["start_step"] == 12 and summary["steps"] == 16
    out = capsys.readouterr().out
    assert "resumed from" in out and "with changed settings:" in out
    assert "num_steps: 12 -> 16" in out and "log.every_steps: 2 -> 4" in out


def test_resume_restores_into_abstract_shapes_without_a_fresh_state(run_12, tmp_path, monkeypatch):
    import shutil

    workdir = tmp_path / "again"
    shutil.copytree(run_12, workdir)
    (workdir / "summary.json").unlink()

    def no_fresh_state(*args, **kwargs):
        raise AssertionError("resume built a fresh train state")

    monkeypatch.setattr(steps, "create_train_state", no_fresh_state)
    summary = vmoe_train.train(_config(*KEEP_WORST), workdir)
    assert summary["start_step"] == 12


def test_finetune_from_a_step_directory(run_12, tmp_path):
    oldest = min(checkpoints.scan(run_12 / "checkpoints").complete)
    config = _config("num_steps=4", f"finetune.init_from={run_12 / 'checkpoints' / str(oldest)}")
    summary = vmoe_train.train(config, tmp_path / "ft")
    assert summary["steps"] == 4 and summary["start_step"] == 0


class Boom(Callback):
    def __init__(self):
        self.aborted = None

    def on_step_end(self, step, metrics):
        if step == 6:
            raise RuntimeError("boom at step 6")

    def on_train_abort(self, error):
        self.aborted = error


def test_a_crash_closes_callbacks_and_finishes_the_pending_checkpoint(tmp_path):
    boom = Boom()
    with pytest.raises(RuntimeError, match="boom at step 6"):
        vmoe_train.train(_config("log.callbacks=('jsonl', 'progress')"), tmp_path, callbacks=[boom])
    assert isinstance(boom.aborted, RuntimeError)
    ckpt = vmoe_train.Checkpointer(tmp_path / "checkpoints", every_steps=0, keep=0)
    assert ckpt.steps() == [4]  # the async write of step 4 was waited for
    ckpt.close()
    assert [r["step"] for r in _jsonl(tmp_path)] == [2, 4, 6][: len(_jsonl(tmp_path))]


def test_the_abstract_state_a_resume_restores_into_is_the_fresh_states_layout():
    from vmoe_train import setup

    for frozen in ("", "head"):  # frozen params: a masked optimizer state
        built = setup.build(_config(f"optimizer.frozen={frozen}"))
        args = (built.model, built.optimizer)
        abstract = steps.abstract_train_state(*args, built.sample_images, built.strategy)
        fresh = steps.create_train_state(*args, 0, built.sample_images, built.strategy)
        a, f = jax.tree_util.tree_flatten(abstract), jax.tree_util.tree_flatten(fresh)
        assert a[1] == f[1]
        for x, y in zip(a[0], f[0], strict=True):
            assert (x.shape, x.dtype) == (y.shape, y.dtype)
            assert x.sharding.is_equivalent_to(y.sharding, y.ndim), (x.sharding, y.sharding)
            assert isinstance(x.sharding, jax.sharding.NamedSharding)  # on the mesh, not a device
