"""Validation of the training run: processes, optimizer, checkpoints, and the fine-tuning source
(with `checkpoint_steps`, the steps saved under a run or checkpoint directory)."""

from __future__ import annotations

import os
import pathlib

from vmoe_train.config.checker import MISSING, Checker
from vmoe_train.config.fields import KEEP_BEST_METRICS, OPTIMIZERS, SCHEDULES


def check_distributed(checker: Checker, num_processes: int | None) -> int | None:
    """Checks `distributed.*`; returns the process count to split batches over."""
    address = checker.get("distributed.coordinator_address")
    if isinstance(address, str) and address and address != "auto":
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            checker.add(
                "distributed.coordinator_address",
                "must be '' (one process), 'host:port' (e.g. '10.0.0.1:1234') or 'auto' (the "
                "cluster's, e.g. SLURM)",
                address,
            )
    count = checker.int_("distributed.num_processes", 1)
    if count is not MISSING:
        checker.int_("distributed.process_id", 0, count - 1)
    else:
        checker.int_("distributed.process_id", 0)
    if num_processes is not None:
        return num_processes
    return None if count is MISSING else count


def check_optimizer(checker: Checker) -> None:
    name = checker.choice("optimizer.name", OPTIMIZERS, "optimizer")
    checker.number("optimizer.learning_rate", 0, low_open=True)
    for path in ("optimizer.b1", "optimizer.b2", "optimizer.momentum"):
        if path != "optimizer.momentum" or name == "sgd":
            checker.number(path, 0, 1, high_open=True)
    checker.number("optimizer.weight_decay", 0)
    checker.number("optimizer.grad_clip_norm", 0)
    checker.choice("optimizer.schedule", SCHEDULES, "schedule")
    checker.number("optimizer.end_lr_ratio", 0, 1)
    warmup = checker.int_("optimizer.warmup_steps", 0)
    steps = checker.get("num_steps")
    if warmup is not MISSING and steps is not MISSING and warmup > steps:
        checker.add("optimizer.warmup_steps", f"must be <= num_steps={steps}", warmup)
    for path in ("optimizer.frozen", "optimizer.weight_decay_on"):
        value = checker.get(path)
        if value is not MISSING:
            checker.regex(path, value)
    multipliers = checker.get("optimizer.lr_multipliers")
    if multipliers is MISSING:
        return
    from vmoe_plugins import is_number

    for i, pair in enumerate(multipliers):
        path = f"optimizer.lr_multipliers[{i}]"
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            checker.add(path, "must be a (regex, multiplier) pair", pair)
        elif not is_number(pair[1]) or pair[1] < 0:
            checker.add(path, "its multiplier must be a finite number >= 0", pair)
        else:
            checker.regex(path, pair[0])


def check_checkpoints(checker: Checker) -> None:
    checker.int_("checkpoint.every_steps", 0)
    checker.int_("checkpoint.keep", 1)
    metric = checker.get("checkpoint.keep_best")
    if metric is MISSING or metric == "":
        return
    splits = checker.get("dataset.eval_splits")
    splits = list(splits) if splits is not MISSING else []
    split, sep, kind = metric.rpartition("/")
    if not sep or split not in splits or kind not in KEEP_BEST_METRICS:
        examples = [f"{s}/{k}" for s in splits for k in KEEP_BEST_METRICS]
        checker.add(
            "checkpoint.keep_best",
            "must be '' or '<split>/accuracy' or '<split>/loss' for a split in "
            f"dataset.eval_splits: {examples}",
            metric,
        )


def checkpoint_steps(path: str | os.PathLike) -> list[int]:
    """The steps saved under `path`: a run dir (`<run>/checkpoints/<step>`), a checkpoint dir
    (`<dir>/<step>`) or one step's dir. Sorted; [] if none."""
    path = pathlib.Path(path).expanduser()
    for folder in (path, path / "checkpoints"):
        if folder.is_dir():
            steps = sorted(
                int(child.name)
                for child in folder.iterdir()
                if child.name.isdigit() and child.is_dir()
            )
            if steps:
                return steps
    if path.is_dir() and path.name.isdigit():
        return [int(path.name)]
    return []


def check_finetune(checker: Checker) -> None:
    step = checker.int_("finetune.step", -1)
    path = checker.get("finetune.init_from")
    if path is MISSING or path == "":
        return
    if not os.path.exists(os.path.expanduser(path)):
        checker.add("finetune.init_from", "does not exist", path)
        return
    steps = checkpoint_steps(path)
    if not steps:
        checker.add(
            "finetune.init_from",
            "has no checkpoint: no numeric step directories in it or in its checkpoints/",
            path,
        )
    elif step is not MISSING and step != -1 and step not in steps:
        checker.add("finetune.step", f"is not saved in finetune.init_from; steps: {steps}", step)
