"""Training configs: load them by name or path, override fields, validate them, save them.

A config is a Python file with `get_config() -> ml_collections.ConfigDict` and a docstring
saying what it trains and how long it takes. The shipped ones live in `vmoe_train.configs`
(`shipped_configs()` lists them); `vmoe_train/configs/base.py` documents every field.

    config = load_config("digits_vmoe")                  # or load_config("path/to/my_config.py")
    config = apply_overrides(config, ["model.moe.router=bpr", "model.moe.router_options.k=1"])
    check_config(config, num_devices=jax.device_count())  # ConfigError listing every problem

`validate_config` checks every field before anything compiles and reports all problems at
once, each naming its field: numbers out of range, unknown names (dataset, model, router,
expert type, strategy, optimizer, ...), router options the router refuses (K > E), batches that
do not split over processes and devices, routing groups that do not divide the tokens, pp specs
that fail on the data, a fine-tuning checkpoint that is not there.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import importlib
import importlib.util
import json
import math
import os
import pathlib
import pkgutil
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ml_collections import ConfigDict

SHIPPED_PACKAGE = "vmoe_train.configs"
DEFAULT_CONFIG = "digits_vmoe"
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
LOSSES = ("softmax", "sigmoid")
DTYPES = ("float32", "bfloat16")
DATA_CACHE = {"auto": None, "always": True, "never": False}  # -> vmoe_data pipelines' `cache`
DISPATCH_DTYPES = ("", *DTYPES)  # "" = the compute dtype
CLASSIFIERS = ("token", "gap")
KEEP_BEST_METRICS = ("accuracy", "loss")
# Dicts of free-form options: any key may be added (by an override or a config file).
OPEN_FIELDS = ("model.moe.router_options",)
# Fields that take more than one type (the base config's value fixes the type of the others).
UNION_FIELDS: Mapping[str, tuple[type, ...]] = {
    "model.moe.layers": (str, tuple),
    "log.profile_steps": (int, tuple),
}
# Mesh axes of the built-in sharding strategies (plugins: not checked).
STRATEGY_AXES: Mapping[str, tuple[str, ...]] = {
    "data": ("data",),
    "expert": ("data", "expert"),
    "fsdp": ("data", "fsdp"),
    "expert_fsdp": ("data", "expert"),
}

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "apply_overrides",
    "check_config",
    "checkpoint_steps",
    "config_from_json",
    "config_name",
    "config_to_json",
    "load_config",
    "shipped_configs",
    "validate_config",
]


class ConfigError(ValueError):
    """A config with problems; `problems` lists them all, each naming its field."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"{n} problem{'' if n == 1 else 's'} in the config:{lines}")


# ---------------------------------------------------------------------------------------------
# Loading


def shipped_configs() -> dict[str, str]:
    """The shipped configs: {name: the first line of its docstring}, sorted by name."""
    package = importlib.import_module(SHIPPED_PACKAGE)
    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{SHIPPED_PACKAGE}.{info.name}")
        if callable(getattr(module, "get_config", None)):  # base.py holds fields, no recipe
            found[info.name] = _first_line(module.__doc__)
    return found


def _first_line(doc: str | None) -> str:
    lines = [line.strip() for line in (doc or "").strip().splitlines()]
    return lines[0] if lines else ""


def _is_path(name_or_path: str) -> bool:
    return (
        name_or_path.endswith(".py")
        or "/" in name_or_path
        or os.sep in name_or_path
        or os.path.isfile(name_or_path)
    )


def config_name(name_or_path: str) -> str:
    """A short name for a config: the shipped name, or the file's stem for a path."""
    return pathlib.Path(name_or_path).stem if _is_path(name_or_path) else name_or_path


def load_config(name_or_path: str) -> ConfigDict:
    """The config of a shipped name ("digits_vmoe") or of a .py file with `get_config()`.

    Raises ConfigError for an unknown name (listing the shipped ones, with a close match), a
    missing file, or a module without `get_config()` / one that returns no ConfigDict. Errors
    raised by the file's own code propagate with their traceback.
    """
    where = f"config={name_or_path!r}"
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ConfigError([f"{where}: must be a shipped config name or a path to a .py file"])
    if _is_path(name_or_path):
        path = pathlib.Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError([f"{where}: no such file"])
        module_name = "_vmoe_config_" + re.sub(r"\W", "_", str(path.resolve()))
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError([f"{where}: cannot be imported as a Python module"])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
    else:
        shipped = shipped_configs()
        if name_or_path not in shipped:
            hint = difflib.get_close_matches(name_or_path, shipped, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                [
                    f"{where}: unknown config{maybe}; shipped: {sorted(shipped)}, "
                    "or give a path to a .py file with get_config()"
                ]
            )
        module = importlib.import_module(f"{SHIPPED_PACKAGE}.{name_or_path}")
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError([f"{where}: the module has no get_config() function"])
    config = get_config()
    if isinstance(config, Mapping) and not isinstance(config, ConfigDict):
        config = ConfigDict(config)
    if not isinstance(config, ConfigDict):
        raise ConfigError(
            [f"{where}: get_config() returned a {type(config).__name__}, not a ConfigDict"]
        )
    return config


# ---------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(
    config: ConfigDict, overrides: Sequence[str] | Mapping[str, Any] | str
) -> ConfigDict:
    """A copy of `config` with `overrides` applied: "a.b.c=value" strings, or {"a.b.c": value}.

    Text values are Python literals (`3`, `1e-3`, `(2, 4)`, `'x'`, `True`), or else the text
    itself (`model.moe.router=bpr`). Each is converted to the type of the field it replaces
    where that is safe (int -> float, an integral float -> int, list -> tuple, "a,b" -> ("a",
    "b") for a tuple field, any text for a string field); other type changes are refused.
    Unknown fields are refused, naming the key and the fields at that level (with a close
    match), except in `router_options`, an open dict of router options. Every problem is
    collected and raised as one ConfigError.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    problems = []
    if isinstance(overrides, Mapping):
        items = [(str(key), value, isinstance(value, str)) for key, value in overrides.items()]
    else:
        items = []
        for text in overrides:
            key, sep, value = str(text).partition("=")
            if not sep or not key.strip():
                problems.append(
                    f"{text!r}: an override is <field>=<value>, e.g. model.moe.router=bpr"
                )
            else:
                items.append((key.strip(), value, True))
    config = copy.deepcopy(config)
    with config.unlocked():
        for key, value, is_text in items:
            problem = _apply_override(config, key, value, is_text)
            if problem:
                problems.append(problem)
    if problems:
        raise ConfigError(problems)
    return config


def _apply_override(config: ConfigDict, key: str, raw: Any, is_text: bool) -> str | None:
    shown = f"{key}={raw}" if is_text else f"{key}={raw!r}"
    parts = key.split(".")
    if any(not part for part in parts):
        return f"{shown}: a field is dot-separated names, e.g. model.moe.router"
    node: Any = config
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not isinstance(node, ConfigDict):
            return f"{shown}: {prefix} is a {type(node).__name__} value, not a group of fields"
        if part not in node:
            if prefix in OPEN_FIELDS and depth == len(parts) - 1:
                node[part] = _parse_value(raw) if is_text else raw  # a new option
                return None
            return f"{key}: {_unknown_field(part, node, prefix)}"
        if depth < len(parts) - 1:
            node = node[part]
    name = parts[-1]
    try:
        value = _convert(key, raw, is_text, node[name])
    except ValueError as error:
        return f"{shown}: {error}"
    try:
        node[name] = value
    except TypeError:  # ml_collections keeps a field's type; _convert allowed this change
        del node[name]
        node[name] = value
    return None


def _unknown_field(name: str, node: ConfigDict, prefix: str) -> str:
    keys = sorted(node.keys())
    hint = difflib.get_close_matches(name, keys, n=1)
    maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown field{maybe}; the fields of {prefix or 'the config'} are {keys}"


def _parse_value(text: str) -> Any:
    """A Python literal, or the text itself."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def _deep_tuple(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_deep_tuple(v) for v in value)
    return value


def _convert(key: str, raw: Any, is_text: bool, current: Any) -> Any:
    """`raw` as a value for the field `key`, whose value is `current` (ValueError if unsafe)."""
    from vmoe_plugins import is_bool, is_int, is_number

    value = _parse_value(raw) if is_text else raw
    kinds = UNION_FIELDS.get(key)
    if kinds is None:
        kinds = () if current is None else (type(current),)
    if not kinds:  # a None field takes anything
        return _deep_tuple(value)
    if isinstance(current, ConfigDict) and ConfigDict in kinds:
        if key in OPEN_FIELDS and isinstance(value, Mapping):
            return ConfigDict(dict(value))
        keys = sorted(current.keys())
        raise ValueError(f"is a group of fields; set them one by one: {key}.<one of {keys}>")
    for kind in kinds:
        if kind is bool:
            if is_bool(value):
                return bool(value)
            if is_text and raw.strip().lower() in ("true", "false"):
                return raw.strip().lower() == "true"
        elif kind is int:
            if is_int(value):
                return int(value)
            if is_number(value) and float(value).is_integer():
                return int(value)
        elif kind is float:
            if is_number(value):
                return float(value)
        elif kind is str:
            if isinstance(value, str):
                return value
            if is_text and not isinstance(value, list | tuple | dict):
                return raw  # "1", "None": the text, for a text field
        elif kind is tuple:
            if isinstance(value, list | tuple):
                return _deep_tuple(value)
            if isinstance(value, str):
                return tuple(part.strip() for part in value.split(",") if part.strip())
            if is_number(value) or is_bool(value):
                return (value,)
    names = " or ".join(_TYPE_NAMES.get(kind, kind.__name__) for kind in kinds)
    raise ValueError(f"must be {names} (the field's type), got a {type(value).__name__}")


_TYPE_NAMES = {
    bool: "True or False",
    int: "an integer",
    float: "a number",
    str: "a string",
    tuple: "a tuple",
}


# ---------------------------------------------------------------------------------------------
# Validation

_MISSING = object()


class _Checker:
    """Collects problems; `get(path)` is a field's value, or _MISSING if absent or mistyped."""

    def __init__(self, config: ConfigDict) -> None:
        self.config = config
        self.problems: list[str] = []
        self.bad: set[str] = set()

    def add(self, path: str, message: str, value: Any = _MISSING) -> None:
        self.bad.add(path)
        shown = path if value is _MISSING else f"{path}={value!r}"
        self.problems.append(f"{shown}: {message}")

    def get(self, path: str) -> Any:
        if path in self.bad:
            return _MISSING
        node: Any = self.config
        for part in path.split("."):
            if not isinstance(node, ConfigDict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def int_(self, path: str, low: int | None = None, high: int | None = None) -> Any:
        from vmoe_plugins import is_int

        value = self.get(path)
        if value is _MISSING:
            return _MISSING
        if not is_int(value):
            self.add(path, "must be an integer", value)
            return _MISSING
        if (low is not None and value < low) or (high is not None and value > high):
            self.add(path, _bounds_message(low, high, "<="), value)
            return _MISSING
        return int(value)

    def number(
        self,
        path: str,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> Any:
        from vmoe_plugins import is_number

        value = self.get(path)
        if value is _MISSING:
            return _MISSING
        if not is_number(value):
            self.add(path, "must be a finite number", value)
            return _MISSING
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            low_op = "<" if low_open else "<="
            high_op = "<" if high_open else "<="
            if low is not None and high is not None:
                message = f"must be in {low} {low_op} x {high_op} {high}"
            elif low is not None:
                message = f"must be {'>' if low_open else '>='} {low}"
            else:
                message = f"must be {high_op} {high}"
            self.add(path, message, value)
            return _MISSING
        return value

    def choice(self, path: str, choices: Sequence[str], kind: str, registry: Any = None) -> Any:
        """The value at `path` if it is one of `choices`. With a plugin `registry`, a name of a
        known plugin package that is not installed is reported with the package to install."""
        value = self.get(path)
        if value is _MISSING:
            return _MISSING
        if value not in choices:
            missing = registry.missing_hint(value) if isinstance(value, str) and registry else ""
            if missing:
                self.add(path, f"{missing}; installed: {list(choices)}", value)
            else:
                self.add(path, _unknown_name(kind, value, choices), value)
            return _MISSING
        return value

    def regex(self, path: str, value: Any) -> None:
        if not isinstance(value, str):
            self.add(path, "must be a regular expression (a string)", value)
            return
        try:
            re.compile(value)
        except re.error as error:
            self.add(path, f"is not a valid regular expression: {error}", value)


def _bounds_message(low: Any, high: Any, op: str) -> str:
    if low is not None and high is not None:
        return f"must be in {low} {op} x {op} {high}"
    return f"must be >= {low}" if low is not None else f"must be <= {high}"


def _unknown_name(kind: str, value: Any, choices: Sequence[str]) -> str:
    hint = difflib.get_close_matches(str(value), list(choices), n=1)
    maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {kind}{maybe}; allowed: {list(choices)}"


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
    checker = _Checker(config)
    _check_schema(checker)
    _check_numbers(checker)
    processes = _check_distributed(checker, num_processes)
    dataset = _check_dataset(checker)
    images = _check_pp(checker, dataset)
    _check_batches(checker, processes, num_devices)
    _check_model(checker, dataset, images, num_devices)
    _check_sharding(checker, num_devices)
    _check_optimizer(checker)
    _check_checkpoints(checker)
    _check_finetune(checker)
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


def _check_schema(checker: _Checker) -> None:
    """Unknown and missing fields, and each field's type against the base config's."""
    from vmoe_train.configs.base import base_config

    _check_node(checker, checker.config, base_config(), "")


def _check_node(checker: _Checker, node: Any, base: ConfigDict, prefix: str) -> None:
    from vmoe_plugins import is_bool, is_int, is_number

    for key in sorted(set(node.keys()) - set(base.keys())):
        checker.add(_join(prefix, key), _unknown_field(key, base, prefix))
    for key in base:
        path, expected = _join(prefix, key), base[key]
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
            names = " or ".join(_TYPE_NAMES.get(kind, kind.__name__) for kind in kinds)
            checker.add(path, f"must be {names}", value)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_numbers(checker: _Checker) -> None:
    """Ranges of the plain numbers and choices that no other check reads."""
    checker.int_("seed", 0)
    checker.int_("dataset.num_workers", 0)
    checker.choice("dataset.cache", tuple(DATA_CACHE), "dataset cache setting")
    checker.int_("num_steps", 1)
    checker.int_("model.mlp_dim", 0)
    checker.int_("model.representation_size", 0)
    checker.choice("model.classifier", CLASSIFIERS, "classifier")
    checker.number("model.dropout_rate", 0, 1, high_open=True)
    checker.choice("model.dtype", DTYPES, "dtype")
    checker.choice("loss.kind", LOSSES, "loss")
    checker.number("loss.label_smoothing", 0, 1, high_open=True)
    checker.int_("eval.every_steps", 0)
    checker.number("eval.capacity_factor", 0)
    checker.int_("log.every_steps", 0)
    _check_log(checker)


def _check_log(checker: _Checker) -> None:
    from vmoe_plugins import is_int

    names = checker.get("log.callbacks")
    if names is not _MISSING:
        try:
            from vmoe_train.callbacks import available_callbacks

            available = available_callbacks()
        except ImportError:  # pragma: no cover - callbacks are part of this package
            available = None
        for i, name in enumerate(names):
            if not isinstance(name, str) or (available is not None and name not in available):
                checker.add(
                    f"log.callbacks[{i}]", _unknown_name("callback", name, available or []), name
                )
    steps = checker.get("log.profile_steps")
    if steps is _MISSING:
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


def _check_distributed(checker: _Checker, num_processes: int | None) -> int | None:
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
    if count is not _MISSING:
        checker.int_("distributed.process_id", 0, count - 1)
    else:
        checker.int_("distributed.process_id", 0)
    if num_processes is not None:
        return num_processes
    return None if count is _MISSING else count


@dataclasses.dataclass
class _Images:
    """What the pp specs produce on the first example: [H, W] of train and eval images."""

    train: tuple[int, int] | None = None
    eval: tuple[int, int] | None = None


def _check_dataset(checker: _Checker) -> Any:
    """Checks `dataset.*`; returns the dataset (metadata only) if it opens, else None."""
    import vmoe_data

    splits = checker.get("dataset.eval_splits")
    if splits is not _MISSING:
        if not all(isinstance(s, str) and s for s in splits):
            checker.add("dataset.eval_splits", "must be a tuple of split names", splits)
        elif len(set(splits)) != len(splits):
            checker.add("dataset.eval_splits", "names a split twice", splits)
    train_split = checker.get("dataset.train_split")
    if train_split == "":
        checker.add("dataset.train_split", "must be a split name, e.g. 'train'", train_split)
    name = checker.get("dataset.name")
    if name is _MISSING:
        return None
    available = vmoe_data.available_datasets()
    family = name.split(":", 1)[0] if ":" in name and name not in available else name
    if family not in available:
        checker.add("dataset.name", _unknown_name("dataset", family, available), name)
        return None
    options = {}
    data_dir = checker.get("dataset.data_dir")
    if isinstance(data_dir, str) and data_dir:
        if vmoe_data.DATASETS.accepts(family, "data_dir"):
            options["data_dir"] = data_dir
        else:
            checker.add("dataset.data_dir", f"dataset {family!r} takes no data_dir", data_dir)
    try:
        dataset = vmoe_data.get_dataset(name, **options)
    except Exception as error:  # tfds not prepared, a bad folder, a plugin's own errors
        checker.add("dataset.name", _message(error), name)
        return None
    classes = checker.get("dataset.classes")
    if classes is not _MISSING and classes != ():
        try:
            dataset = vmoe_data.select_classes(dataset, classes)
        except ValueError as error:
            checker.add("dataset.classes", _message(error), classes)
            return None
    for path, split in _dataset_splits(checker):
        try:
            size = dataset.num_examples(split)
        except ValueError as error:
            checker.add(path, _message(error), split)
            continue
        if size == 0:
            checker.add(path, f"is empty in dataset {name!r}", split)
    return dataset


def _dataset_splits(checker: _Checker) -> list[tuple[str, str]]:
    """(path, split) of every split the config names, skipping mistyped ones."""
    found = []
    train = checker.get("dataset.train_split")
    if isinstance(train, str) and train:
        found.append(("dataset.train_split", train))
    splits = checker.get("dataset.eval_splits")
    if splits is not _MISSING:
        found += [(f"dataset.eval_splits[{i}]", s) for i, s in enumerate(splits) if s]
    test = checker.get("dataset.test_split")
    if isinstance(test, str) and test:
        found.append(("dataset.test_split", test))
    return found


def _message(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def _check_pp(checker: _Checker, dataset: Any) -> _Images:
    """Parses the pp specs and runs them on the first example of their split."""
    import numpy as np

    import vmoe_data

    images = _Images()
    valid_splits = {split for path, split in _dataset_splits(checker) if path not in checker.bad}
    eval_splits = [  # pp.eval runs on the eval splits, then on the test split
        split
        for path, split in _dataset_splits(checker)
        if path != "dataset.train_split" and split in valid_splits
    ]
    for path in ("pp.train", "pp.eval"):
        spec = checker.get(path)
        if spec is _MISSING:
            continue
        try:
            pp = vmoe_data.preprocess(spec)
        except ValueError as error:
            checker.add(path, _message(error), spec)
            continue
        if path == "pp.eval" and pp.batch_ops:
            ops = [text for text, _ in pp.batch_ops]
            checker.add(path, f"has batch ops {ops}: they belong in pp.train only", spec)
            continue
        if dataset is None:
            continue
        if path == "pp.train":
            split = checker.get("dataset.train_split")
            split = split if split in valid_splits else None
        else:
            split = eval_splits[0] if eval_splits else None
        if split is None:
            continue
        try:
            example = dataset.source(split)[0]
            out = pp(dict(example), np.random.default_rng(0))
        except Exception as error:
            checker.add(path, f"fails on the first example of {split!r}: {_message(error)}", spec)
            continue
        image = out.get("image") if isinstance(out, Mapping) else None
        if np.ndim(image) != 3:
            checker.add(path, "must produce an 'image' [height, width, channels]", spec)
            continue
        hw = tuple(int(n) for n in np.shape(image)[:2])
        wanted = ("labels", "label") if path == "pp.train" else ("label",)
        if not any(key in out for key in wanted):
            checker.add(path, f"must keep {' or '.join(map(repr, wanted))}", spec)
            continue
        labels = out.get("labels")
        if path == "pp.train" and labels is not None:
            depth = np.shape(labels)[-1] if np.ndim(labels) else None
            if depth != dataset.num_classes:
                checker.add(
                    path,
                    f"gives 'labels' of depth {depth}; dataset {dataset.name!r} has "
                    f"{dataset.num_classes} classes (use onehot({dataset.num_classes}))",
                    spec,
                )
        if path == "pp.train":
            images.train = hw
        else:
            images.eval = hw
    if images.train and images.eval and images.train != images.eval:
        checker.add(
            "pp.eval",
            f"makes {_hw(images.eval)} images but pp.train {_hw(images.train)}: the model's "
            "position embeddings fit one size",
            checker.get("pp.eval"),
        )
        images.eval = None
    return images


def _hw(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def _check_batches(checker: _Checker, processes: int | None, devices: int | None) -> None:
    for path in ("batch_size", "eval_batch_size"):
        size = checker.int_(path, 1)
        if size is _MISSING:
            continue
        if processes and size % processes:
            checker.add(
                path,
                f"must be divisible by the {processes} processes (distributed.num_processes)",
                size,
            )
        elif devices and size % devices:
            checker.add(
                path, f"must be divisible by the {devices} devices (it is split over them)", size
            )


def _is_moe(checker: _Checker) -> bool:
    model = checker.config.get("model")  # even a bad name says the family
    name = model.get("name") if isinstance(model, ConfigDict) else None
    return isinstance(name, str) and name.startswith("V-MoE-")


def _check_model(checker: _Checker, dataset: Any, images: _Images, devices: int | None) -> None:
    import vmoe_layers

    name = checker.get("model.name")
    model = None
    if name is not _MISSING:
        try:
            model = vmoe_layers.create_model(name, num_classes=None)
        except ValueError as error:
            checker.add("model.name", _message(error), name)
    tokens = None
    if model is not None:
        hw = images.eval or images.train
        if hw is not None:
            p = model.patch_size
            if hw[0] % p or hw[1] % p:
                checker.add(
                    "model.name",
                    f"patch size {p} does not divide the {_hw(hw)} images of the pp specs",
                    name,
                )
            else:
                class_token = checker.get("model.classifier") != "gap"
                tokens = (hw[0] // p) * (hw[1] // p) + class_token
    if not _is_moe(checker):
        return  # model.moe is ignored for a dense ViT
    num_experts = checker.int_("model.moe.num_experts", 1)
    layers = checker.get("model.moe.layers")
    if model is not None and layers is not _MISSING:
        try:
            vmoe_layers.moe_block_indices(layers, model.num_layers)
        except ValueError as error:
            checker.add(
                "model.moe.layers",
                f"{_message(error)} ({name} has {model.num_layers} blocks)",
                layers,
            )
    checker.choice(
        "model.moe.expert_type",
        vmoe_layers.available_expert_types(),
        "expert type",
        vmoe_layers.EXPERT_TYPES,
    )
    checker.choice("model.moe.dispatch_dtype", DISPATCH_DTYPES, "dispatch dtype")
    _check_router(checker, num_experts)
    _check_groups(checker, tokens, devices)
    if model is not None and not any(path.startswith("model.") for path in checker.bad):
        from vmoe_train.setup import build_model

        try:
            build_model(checker.config, num_classes=getattr(dataset, "num_classes", None))
        except (ValueError, TypeError) as error:
            checker.add("model", _message(error))


def _check_router(checker: _Checker, num_experts: Any) -> None:
    import vmoe_layers
    import vmoe_routing

    router = checker.choice(
        "model.moe.router", vmoe_routing.available_routers(), "router", vmoe_routing.ROUTERS
    )
    options = checker.get("model.moe.router_options")
    if router is _MISSING or options is _MISSING or num_experts is _MISSING:
        return
    options = options.to_dict()
    if "num_experts" in options:
        checker.add(
            "model.moe.router_options.num_experts",
            "set model.moe.num_experts instead",
            options["num_experts"],
        )
        return
    defaults = {
        key: value
        for key, value in vmoe_layers.DEFAULT_ROUTER_OPTIONS.items()
        if vmoe_routing.ROUTERS.accepts(router, key)
    }
    merged = {**defaults, **options}
    try:
        vmoe_routing.get_router(router, num_experts=num_experts, **merged)
    except (ValueError, TypeError) as error:
        text = re.sub(r"\bnum_experts=", "model.moe.num_experts=", _message(error))
        match = re.match(r"^(\w+)=(\S+?):? (.*)$", text)
        if match and match.group(1) in merged:
            option = match.group(1)
            default = "" if option in options else " (the default; set it in router_options)"
            checker.problems.append(
                f"model.moe.router_options.{option}={match.group(2)}: {match.group(3)}{default}"
            )
        else:
            checker.problems.append(f"model.moe.router_options: {text}")
        checker.bad.add("model.moe.router_options")


def _check_groups(checker: _Checker, tokens: int | None, devices: int | None) -> None:
    group = checker.int_("model.moe.group_images", 0)
    if group is _MISSING:
        return
    if group == 0:  # a group is the per-device train batch, at evaluation too (one model)
        train, evaluation = checker.get("batch_size"), checker.get("eval_batch_size")
        if train is not _MISSING and evaluation is not _MISSING and evaluation % train:
            checker.add(
                "eval_batch_size",
                f"must be a multiple of batch_size={train} with model.moe.group_images=0 "
                "(a routing group is then the per-device train batch); or set group_images",
                evaluation,
            )
        return
    for path in ("batch_size", "eval_batch_size"):
        size = checker.get(path)
        if size is _MISSING:
            continue
        if devices:
            if size % devices:
                continue  # reported with the batch size
            per_device = size // devices
            where = f"the per-device batch ({path}={size} / {devices} devices = {per_device})"
        else:
            per_device, where = size, f"{path}={size}"
        if per_device % group:
            detail = ""
            if tokens:
                detail = (
                    f": a routing group of {group} x {tokens} = {group * tokens} tokens does not "
                    f"divide the {per_device} x {tokens} = {per_device * tokens} tokens"
                )
            checker.add("model.moe.group_images", f"must be 0 or divide {where}{detail}", group)
            return


def _check_sharding(checker: _Checker, devices: int | None) -> None:
    import vmoe_layers

    strategy = checker.choice(
        "sharding.strategy", vmoe_layers.available_strategies(), "sharding strategy"
    )
    shape = checker.get("sharding.mesh_shape")
    if shape is _MISSING:
        return
    from vmoe_plugins import is_int

    if not all(is_int(n) and n >= 1 for n in shape):
        checker.add("sharding.mesh_shape", "must be () or a tuple of integers >= 1", shape)
        return
    axes = STRATEGY_AXES.get(strategy) if strategy is not _MISSING else None
    if shape and axes is not None and len(shape) != len(axes):
        checker.add(
            "sharding.mesh_shape",
            f"must have {len(axes)} ax{'i' if len(axes) == 1 else 'e'}s {axes} for "
            f"sharding.strategy={strategy!r}",
            shape,
        )
        return
    if shape and devices and math.prod(shape) != devices:
        checker.add(
            "sharding.mesh_shape",
            f"needs {math.prod(shape)} devices; there are {devices}: its product must be "
            f"{devices} (or () for the strategy's default)",
            shape,
        )
        return
    if strategy in ("expert", "expert_fsdp") and _is_moe(checker):
        experts = checker.get("model.moe.num_experts")
        size = shape[1] if shape else devices
        if experts is not _MISSING and size and experts % size:
            checker.add(
                "model.moe.num_experts",
                f"must be a multiple of the 'expert' mesh axis ({size}) for "
                f"sharding.strategy={strategy!r}",
                experts,
            )


def _check_optimizer(checker: _Checker) -> None:
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
    if warmup is not _MISSING and steps is not _MISSING and warmup > steps:
        checker.add("optimizer.warmup_steps", f"must be <= num_steps={steps}", warmup)
    for path in ("optimizer.frozen", "optimizer.weight_decay_on"):
        value = checker.get(path)
        if value is not _MISSING:
            checker.regex(path, value)
    multipliers = checker.get("optimizer.lr_multipliers")
    if multipliers is _MISSING:
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


def _check_checkpoints(checker: _Checker) -> None:
    checker.int_("checkpoint.every_steps", 0)
    checker.int_("checkpoint.keep", 1)
    metric = checker.get("checkpoint.keep_best")
    if metric is _MISSING or metric == "":
        return
    splits = checker.get("dataset.eval_splits")
    splits = list(splits) if splits is not _MISSING else []
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


def _check_finetune(checker: _Checker) -> None:
    step = checker.int_("finetune.step", -1)
    path = checker.get("finetune.init_from")
    if path is _MISSING or path == "":
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
    elif step is not _MISSING and step != -1 and step not in steps:
        checker.add("finetune.step", f"is not saved in finetune.init_from; steps: {steps}", step)


# ---------------------------------------------------------------------------------------------
# JSON


def config_get(config: Any, dotted: str, default: Any = None) -> Any:
    """`config.a.b` for "a.b" (ConfigDict, dict or object); `default` where a part is missing
    (for code that reads configs saved by older versions or written by hand)."""
    value = config
    for part in dotted.split("."):
        if isinstance(value, Mapping):
            if part not in value:
                return default
            value = value[part]
        else:
            try:
                value = getattr(value, part)
            except (AttributeError, KeyError):
                return default
    return value


def config_to_json(config: ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """`config` as plain JSON data (tuples as lists), e.g. to save next to checkpoints."""
    data = config.to_dict() if isinstance(config, ConfigDict) else dict(config)
    return _plain(data, "")


def _plain(value: Any, path: str) -> Any:
    from vmoe_plugins import is_bool, is_int, is_number

    if isinstance(value, Mapping):
        return {str(k): _plain(v, _join(path, str(k))) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, str):
        return value
    if is_bool(value):
        return bool(value)
    if is_int(value):
        return int(value)
    if is_number(value):
        return float(value)
    raise TypeError(f"config field {path}={value!r} is not JSON data")


def config_from_json(data: Mapping[str, Any] | str) -> ConfigDict:
    """The ConfigDict of `config_to_json`'s output (or its JSON text); lists become tuples."""
    if isinstance(data, str):
        data = json.loads(data)
    return ConfigDict(_from_plain(data))


def _from_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _from_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_from_plain(v) for v in value)
    return value
