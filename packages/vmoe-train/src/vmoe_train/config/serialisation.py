"""Configs as JSON (saved next to checkpoints) and back, and `config_get`, the reader of fields
that configs saved by older versions may lack."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ml_collections import ConfigDict

from vmoe_train.config.fields import join


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
        return {str(k): _plain(v, join(path, str(k))) for k, v in value.items()}
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
