"""Validation: `validate_config` lists every problem of a config before anything compiles, each
naming its field; `check_config` raises them as one ConfigError.

The checks live by concern: the schema (unknown, missing and mistyped fields) and plain numbers
here, the data in `data_checks`, the model, router and sharding in `model_checks`, processes,
optimizer, checkpoints and fine-tuning in `training_checks`; `checker` is their framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ml_collections import ConfigDict

from vmoe_train.config.checker import MISSING, Checker, unknown_name
from vmoe_train.config.data_checks import check_batches, check_dataset, check_pp
from vmoe_train.config.fields import (
    CLASSIFIERS,
    DATA_CACHE,
    DTYPES,
    LOSSES,
    MODEL_SIZE_FIELDS,
    OPEN_FIELDS,
    REMAT,
    TYPE_NAMES,
    UNION_FIELDS,
    ConfigError,
    join,
    unknown_field,
)
from vmoe_train.config.model_checks import check_model, check_sharding
from vmoe_train.config.training_checks import (
    check_checkpoints,
    check_distributed,
    check_finetune,
    check_optimizer,
)


def validate_config(
    config: ConfigDict | Mapping[str, Any],
    *,
    num_devices: int | None = None,
    num_processes: int | None = None,
) -> list[str]:
    """Every problem of `config`, each naming its field ([] if none); nothing compiles.

    Args:
      num_devices: the global device count (`jax.device_count()`); None skips the checks that
        need it (batches split over devices, mesh shapes).
      num_processes: the process count; None: the config's `distributed.num_processes`.

    It reads the dataset's metadata and runs the pp specs on its first example (a second for
    the embedded digits the first time; a tfds dataset is never built: one that is not
    prepared is reported), and builds the router with its options, the model unbuilt.
    """
    if not isinstance(config, ConfigDict):
        config = ConfigDict(dict(config))
    checker = Checker(config)
    _check_schema(checker)
    _check_numbers(checker)
    processes = check_distributed(checker, num_processes)
    dataset = check_dataset(checker)
    images = check_pp(checker, dataset)
    check_batches(checker, processes, num_devices)
    check_model(checker, dataset, images, num_devices)
    check_sharding(checker, num_devices)
    check_optimizer(checker)
    check_checkpoints(checker)
    check_finetune(checker)
    return checker.problems


def check_config(
    config: ConfigDict,
    *,
    num_devices: int | None = None,
    num_processes: int | None = None,
) -> ConfigDict:
    """`config` if `validate_config` finds nothing, else a ConfigError listing every problem."""
    problems = validate_config(config, num_devices=num_devices, num_processes=num_processes)
    if problems:
        raise ConfigError(problems)
    return config


def _check_schema(checker: Checker) -> None:
    """Unknown and missing fields, and each field's type against the base config's."""
    from vmoe_train.configs.base import base_config

    _check_node(checker, checker.config, base_config(), "")


def _check_node(checker: Checker, node: Any, base: ConfigDict, prefix: str) -> None:
    from vmoe_plugins import is_bool, is_int, is_number

    for key in sorted(set(node.keys()) - set(base.keys())):
        checker.add(join(prefix, key), unknown_field(key, base, prefix))
    for key in base:
        path, expected = join(prefix, key), base[key]
        if key not in node:
            if isinstance(expected, ConfigDict):
                checker.add(path, f"missing: a group of fields {sorted(expected.keys())}")
            else:
                checker.add(path, f"missing (the base config's value: {expected!r})")
            continue
        value = node[key]
        if isinstance(expected, ConfigDict):
            if not isinstance(value, ConfigDict):
                checker.add(path, "must be a group of fields", value)
            elif path not in OPEN_FIELDS:
                _check_node(checker, value, expected, path)
            continue
        kinds = UNION_FIELDS.get(path, (type(expected),))
        ok = {
            bool: is_bool(value),
            int: is_int(value),
            float: is_number(value),
            str: isinstance(value, str),
            tuple: isinstance(value, tuple | list),
        }
        if expected is not None and not any(
            ok.get(kind, isinstance(value, kind)) for kind in kinds
        ):
            names = " or ".join(TYPE_NAMES.get(kind, kind.__name__) for kind in kinds)
            checker.add(path, f"must be {names}", value)


def _check_numbers(checker: Checker) -> None:
    """Ranges of the plain numbers and choices that no other check reads."""
    checker.int_("seed", 0)
    checker.int_("dataset.num_workers", 0)
    checker.choice("dataset.cache", tuple(DATA_CACHE), "dataset cache setting")
    _check_length(checker)
    for field in MODEL_SIZE_FIELDS:  # 0: the preset's (model_checks checks them together)
        checker.int_(f"model.{field}", 0)
    checker.int_("model.representation_size", 0)
    checker.number("model.head_bias_init")
    checker.choice("model.remat", REMAT, "remat setting")
    checker.choice("model.classifier", CLASSIFIERS, "classifier")
    checker.number("model.dropout_rate", 0, 1, high_open=True)
    checker.choice("model.dtype", DTYPES, "dtype")
    checker.choice("model.param_dtype", DTYPES, "parameter dtype")
    checker.choice("loss.kind", LOSSES, "loss")
    checker.number("loss.label_smoothing", 0, 1, high_open=True)
    checker.int_("eval.every_steps", 0)
    checker.number("eval.capacity_factor", 0)
    checker.int_("log.every_steps", 0)
    _check_log(checker)


def _check_length(checker: Checker) -> None:
    """num_steps >= 1, or num_epochs > 0 with num_steps 0 (one of them says how long)."""
    epochs = checker.number("num_epochs", 0)
    if epochs is MISSING or epochs == 0:
        checker.int_("num_steps", 1)
        return
    steps = checker.int_("num_steps", 0)
    if steps is not MISSING and steps != 0:
        checker.add(
            "num_steps",
            f"must be 0 when num_epochs={epochs} sets the length (give one of the two)",
            steps,
        )


def _check_log(checker: Checker) -> None:
    from vmoe_plugins import is_int
    from vmoe_train.callbacks import CALLBACKS, EVALUATORS_CALLBACK

    available = CALLBACKS.names()
    names = checker.get("log.callbacks")
    if names is not MISSING:
        for i, name in enumerate(names):
            if not isinstance(name, str) or name not in available:
                missing = CALLBACKS.missing_hint(name) if isinstance(name, str) else ""
                message = f"{missing}; installed: {available}" if missing else ""
                message = message or unknown_name("callback", name, available)
                checker.add(f"log.callbacks[{i}]", message, name)
    # The evaluators run only through the callback "evaluators" (vmoe-eval's), which the trainer
    # adds for them (`callbacks.callback_names`): without it they would silently not run.
    evaluators = checker.get("eval.evaluators")
    if evaluators is not MISSING and evaluators and EVALUATORS_CALLBACK not in available:
        checker.add(
            "eval.evaluators",
            f"the evaluators run through the callback {EVALUATORS_CALLBACK!r}, and "
            f"{CALLBACKS.missing_hint(EVALUATORS_CALLBACK)}",
            evaluators,
        )
    steps = checker.get("log.profile_steps")
    if steps is MISSING:
        return
    if isinstance(steps, tuple | list):
        ok = len(steps) == 0 or (
            len(steps) == 2 and all(is_int(n) for n in steps) and steps[0] >= 0 and steps[1] >= 1
        )
    else:
        ok = steps >= 0
    if not ok:
        checker.add(
            "log.profile_steps",
            "must be 0 (off), a number of steps >= 1, or (start_step >= 0, num_steps >= 1)",
            steps,
        )
