"""Export a vmoe-train run's parameters as a checkpoint of the original V-MoE release.

    export_run("runs/s32", "exported/s32", num_shards=2)   # exported/s32.index, .data-0000i-of-...
    export_params(params, "exported/mine")                 # a params tree

The files are what the release's code reads (`vmoe.checkpoints.partitioned.restore_checkpoint`
with `prefix=`; `vmoe_train.original.read_checkpoint` here), with the release's names
(`mapping`) and every array as it is (`convert` reads them back bit for bit). Experts are split
along their expert axis over `num_shards` shards, as the release stored them. Files of an
existing checkpoint at the prefix are never replaced unless `overwrite=True`.
"""

from __future__ import annotations

import glob
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from vmoe_train import checkpoints
from vmoe_train.original.files import INDEX_SUFFIX, checkpoint_prefix, write_checkpoint
from vmoe_train.original.mapping import params_to_original

EXPERTS = "/Moe/Mlp/"  # original arrays with a leading expert axis


def export_params(
    params: Mapping[str, Any],
    prefix: str | os.PathLike,
    *,
    num_shards: int = 1,
    overwrite: bool = False,
) -> list[pathlib.Path]:
    """Writes our params tree as the original checkpoint `prefix` (experts split over
    `num_shards` shards along their expert axis, as the release stored them); returns the files.

    Raises:
      FileExistsError: files of a checkpoint `prefix` exist (named), unless `overwrite`.
      ValueError: parameters without an original name (e.g. `glu` experts).
    """
    if not overwrite:
        _refuse_existing(prefix)
    arrays = {path: np.asarray(value) for path, value in params_to_original(params).items()}
    return write_checkpoint(
        prefix, arrays, num_shards=num_shards, split=lambda path: EXPERTS in path
    )


def export_run(
    run: str | os.PathLike,
    prefix: str | os.PathLike,
    *,
    step: int | None = None,
    num_shards: int = 1,
    overwrite: bool = False,
) -> list[pathlib.Path]:
    """Exports the parameters of checkpoint `step` of `run` (a run dir, its checkpoints/ or one
    <step>/ dir; `step` default: that dir's step, else the latest complete checkpoint) as the
    original checkpoint `prefix`; returns the files written.

    Raises:
      FileNotFoundError: no such run, or no checkpoint of that step (the run's steps named).
      FileExistsError: files of a checkpoint `prefix` exist (named), unless `overwrite`.
    """
    directory, step = run_step(run, step)
    if not overwrite:
        _refuse_existing(prefix)  # before reading anything
    params = checkpoints.restore_params(directory, step=step)
    return export_params(params, prefix, num_shards=num_shards, overwrite=True)


def run_step(run: str | os.PathLike, step: int | None = None) -> tuple[pathlib.Path, int]:
    """(the checkpoints directory of `run`, the step to read): `step`, or the step of the
    <step>/ dir `run` names, or the latest complete one. FileNotFoundError where there is no
    such run or step, listing the steps there are."""
    location = checkpoints.locate(run)  # FileNotFoundError naming the accepted forms
    complete = checkpoints.scan(location.directory).complete
    wanted = step if step is not None else location.step
    if not complete:
        raise FileNotFoundError(f"run {os.fspath(run)!r} has no complete checkpoint")
    if wanted is None:
        return location.directory, complete[-1]
    if wanted not in complete:
        raise FileNotFoundError(
            f"run {os.fspath(run)!r} has no checkpoint of step {wanted}; its steps: {complete}"
        )
    return location.directory, wanted


def existing_files(prefix: str | os.PathLike) -> list[pathlib.Path]:
    """The files of a checkpoint `prefix` that exist: its index and data shards (any count)."""
    prefix = checkpoint_prefix(prefix)
    index = pathlib.Path(f"{prefix}{INDEX_SUFFIX}")
    shards = sorted(prefix.parent.glob(f"{glob.escape(prefix.name)}.data-*-of-*"))
    return [index, *shards] if index.exists() else shards


def _refuse_existing(prefix: str | os.PathLike) -> None:
    existing = existing_files(prefix)
    if existing:
        names = [str(path) for path in existing]
        raise FileExistsError(
            f"a checkpoint {str(checkpoint_prefix(prefix))!r} exists, not overwritten: {names}; "
            "remove its files or choose another prefix"
        )
