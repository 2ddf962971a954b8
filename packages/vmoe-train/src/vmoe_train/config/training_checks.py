"""Validation of the training run: processes, optimizer, checkpoints, and the fine-tuning source
(a fine-tuning source is found by `vmoe_train.checkpoints.locate`, as the trainer finds it)."""

from __future__ import annotations

import pathlib

from vmoe_train.config.checker import MISSING, Checker
from vmoe_train.config.fields import (
    KEEP_BEST_METRICS,
    MU_DTYPES,
    NU_DTYPES,
    OPTIMIZERS,
    SCHEDULES,
)


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
    end = checker.number("optimizer.end_learning_rate")
    peak = checker.get("optimizer.learning_rate")
    if end is not MISSING and peak is not MISSING and end > peak:
        checker.add("optimizer.end_learning_rate", f"must be < 0 (unset) or <= {peak=}", end)
    checker.choice("optimizer.mu_dtype", MU_DTYPES, "first-moment dtype")
    checker.choice("optimizer.nu_dtype", NU_DTYPES, "second-moment dtype")
    checker.int_("optimizer.microsteps", 1)
    warmup = checker.int_("optimizer.warmup_steps", 0)
    steps = checker.get("num_steps")
    if warmup is not MISSING and steps is not MISSING and 0 < steps < warmup:
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
    checker.int_("checkpoint.keep", 0)  # 0: keep all
    checker.choice("checkpoint.keep_best_mode", ("auto", "max", "min"), "best mode")
    check_allowed_changes(checker)
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


def check_allowed_changes(checker: Checker) -> None:
    """resume.allow_changes: config fields or groups ("num_steps", "optimizer")."""
    allowed = checker.get("resume.allow_changes")
    if allowed is MISSING:
        return
    from vmoe_train.configs.base import base_config

    fields = _dotted(base_config().to_dict())
    for name in allowed:
        group = str(name).rstrip(".") + "."
        if not isinstance(name, str) or not (
            name in fields or any(f.startswith(group) for f in fields)
        ):
            checker.add(
                "resume.allow_changes",
                f"{name!r} is not a config field or group (e.g. 'num_steps', 'optimizer', "
                "'model.moe.num_experts')",
                allowed,
            )


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    names = []
    for key, value in tree.items():
        names.append(prefix + key)
        if isinstance(value, dict):
            names += _dotted(value, prefix + key + ".")
    return names


def check_finetune(checker: Checker) -> None:
    step = checker.int_("finetune.step", -1)
    _check_init_rules(checker)
    path = checker.get("finetune.init_from")
    if path is MISSING or path == "":
        for name in ("upcycle", "init_rules"):
            value = checker.get(f"finetune.{name}")
            if value not in (MISSING, False, ()):
                checker.add(f"finetune.{name}", "needs finetune.init_from (the source)", value)
        return
    from vmoe_train import checkpoints  # the one discovery path (trainer, vmoe-eval, CLIs)
    from vmoe_train.init_from import is_npz

    if is_npz(path):  # a vit_jax file: read whole, no steps
        if not pathlib.Path(path).expanduser().is_file():
            checker.add("finetune.init_from", "names a .npz file that does not exist", path)
        if step is not MISSING and step != -1:
            checker.add("finetune.step", "must be -1 with a .npz file (it has no steps)", step)
        return
    try:
        location = checkpoints.locate(path)
    except FileNotFoundError as error:
        checker.add("finetune.init_from", str(error).replace(f"{path!r}", "it"), path)
        return
    complete = checkpoints.scan(location.directory).complete
    if location.step is not None:
        if location.step not in complete:
            checker.add(
                "finetune.init_from", f"is not a complete checkpoint (complete: {complete})", path
            )
        elif step is not MISSING and step not in (-1, location.step):
            checker.add(
                "finetune.step", f"differs from the step finetune.init_from names ({path})", step
            )
    elif not complete:
        checker.add("finetune.init_from", "has no complete checkpoint", path)
    elif step is not MISSING and step != -1 and step not in complete:
        checker.add("finetune.step", f"is not saved in finetune.init_from; steps: {complete}", step)


def _check_init_rules(checker: Checker) -> None:
    """finetune.init_rules, upcycle, upcycle_noise, keep_fresh, unmatched (configs saved before
    them: absent, read as the defaults)."""
    from vmoe_train import init_rules

    rules = checker.get("finetune.init_rules")
    if rules not in (MISSING, ()):
        try:
            init_rules.parse_rules(tuple(rules) if isinstance(rules, list) else rules)
        except ValueError as error:
            checker.add("finetune.init_rules", str(error), rules)
    upcycle = checker.get("finetune.upcycle")
    if upcycle not in (MISSING, True, False):
        checker.add("finetune.upcycle", "must be True or False", upcycle)
    elif upcycle is True and rules not in (MISSING, ()):
        checker.add(
            "finetune.upcycle", "takes its own rules: leave finetune.init_rules empty", upcycle
        )
    if checker.get("finetune.upcycle_noise") is not MISSING:
        checker.number("finetune.upcycle_noise", 0)
    keep = checker.get("finetune.keep_fresh")
    if keep not in (MISSING, ""):
        checker.regex("finetune.keep_fresh", keep)
    if checker.get("finetune.unmatched") is not MISSING:
        checker.choice("finetune.unmatched", init_rules.UNMATCHED, "unmatched policy")
