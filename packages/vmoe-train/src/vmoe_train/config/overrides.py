"""Overrides: "a.b.c=value" strings (or {"a.b.c": value}) applied to a copy of a config, each
value converted to its field's type where that is safe (`apply_overrides`)."""

from __future__ import annotations

import ast
import copy
from collections.abc import Mapping, Sequence
from typing import Any

from ml_collections import ConfigDict

from vmoe_train.config.fields import (
    TYPE_NAMES,
    UNION_FIELDS,
    ConfigError,
    is_open,
    unknown_field,
)


def apply_overrides(
    config: ConfigDict, overrides: Sequence[str] | Mapping[str, Any] | str
) -> ConfigDict:
    """A copy of `config` with `overrides` applied: "a.b.c=value" strings, or {"a.b.c": value}.

    Text values are Python literals (`3`, `1e-3`, `(2, 4)`, `'x'`, `True`), or else the text
    itself (`model.moe.router=bpr`). Each is converted to the type of the field it replaces
    where that is safe (int -> float, an integral float -> int, list -> tuple, "a,b" -> ("a",
    "b") for a tuple field, any text for a string field); other type changes are refused.
    Unknown fields are refused, naming the key and the fields at that level (with a close
    match), except in the open dicts `router_options` and `variants`. Every problem is
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
            if is_open(prefix) and depth == len(parts) - 1:
                node[part] = _parse_value(raw) if is_text else raw  # a new option
                return None
            if is_open(prefix):  # a new group inside an open field (a variant's options)
                node[part] = ConfigDict()
            else:
                return f"{key}: {unknown_field(part, node, prefix)}"
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


def _parse_value(text: str) -> Any:
    """A Python literal, or the text itself."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def deep_tuple(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(deep_tuple(v) for v in value)
    return value


def _convert(key: str, raw: Any, is_text: bool, current: Any) -> Any:
    """`raw` as a value for the field `key`, whose value is `current` (ValueError if unsafe)."""
    from vmoe_plugins import is_bool, is_int, is_number

    value = _parse_value(raw) if is_text else raw
    kinds = UNION_FIELDS.get(key)
    if kinds is None:
        kinds = () if current is None else (type(current),)
    if not kinds:  # a None field takes anything
        return deep_tuple(value)
    if isinstance(current, ConfigDict) and ConfigDict in kinds:
        if is_open(key) and isinstance(value, Mapping):
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
                return deep_tuple(value)
            if isinstance(value, str):
                return tuple(part.strip() for part in value.split(",") if part.strip())
            if is_number(value) or is_bool(value):
                return (value,)
    names = " or ".join(TYPE_NAMES.get(kind, kind.__name__) for kind in kinds)
    raise ValueError(f"must be {names} (the field's type), got a {type(value).__name__}")
