"""load_run finds runs through vmoe-train's one discovery path and says which step it read."""

from __future__ import annotations

import shutil
import warnings

import pytest

from vmoe_eval import loading
from vmoe_train.checkpoints import CheckpointWarning


def test_a_run_its_checkpoints_and_a_step_dir_load_the_same_params(trained):
    workdir = trained[0]
    by_run = loading.load_run(workdir)
    by_dir = loading.load_run(workdir / "checkpoints")
    by_step = loading.load_run(workdir / "checkpoints" / "100")
    assert by_run.step == by_dir.step == 200 and by_step.step == 100
    assert by_run.path == by_step.path == (workdir / "checkpoints").absolute()


def test_the_step_read_is_reported_after_falling_back_past_a_corrupt_one(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained[0] / "checkpoints", copy / "checkpoints")
    for data in (copy / "checkpoints" / "200" / "state").rglob("*"):
        if data.is_file() and data.parent.name == "d":  # OCDBT's array data files
            data.write_bytes(b"")  # truncated: corrupt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = loading.load_run(copy)
    assert run.step == 100  # was: max(steps) = 200, whatever was read
    assert any(issubclass(w.category, CheckpointWarning) for w in caught)


def test_a_path_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        loading.load_run(tmp_path)
