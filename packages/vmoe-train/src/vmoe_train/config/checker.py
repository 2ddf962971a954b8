"""The validation framework: `Checker` collects every problem of a config, each naming its field;
`get(path)` reads a field, and `int_`, `number`, `choice` and `regex` check one. A field with a
problem reads as `MISSING` afterwards, so later checks that need it stay quiet."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from ml_collections import ConfigDict

MISSING = object()


class Checker:
    """Collects problems; `get(path)` is a field's value, or MISSING if absent or mistyped."""

    def __init__(self, config: ConfigDict) -> None:
        self.config = config
        self.problems: list[str] = []
        self.bad: set[str] = set()

    def add(self, path: str, message: str, value: Any = MISSING) -> None:
        self.bad.add(path)
        shown = path if value is MISSING else f"{path}={value!r}"
        self.problems.append(f"{shown}: {message}")

    def get(self, path: str) -> Any:
        if path in self.bad:
            return MISSING
        node: Any = self.config
        for part in path.split("."):
            if not isinstance(node, ConfigDict) or part not in node:
                return MISSING
            node = node[part]
        return node

    def int_(self, path: str, low: int | None = None, high: int | None = None) -> Any:
        from vmoe_plugins import is_int

        value = self.get(path)
        if value is MISSING:
            return MISSING
        if not is_int(value):
            self.add(path, "must be an integer", value)
            return MISSING
        if (low is not None and value < low) or (high is not None and value > high):
            self.add(path, bounds_message(low, high, "<="), value)
            return MISSING
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
        if value is MISSING:
            return MISSING
        if not is_number(value):
            self.add(path, "must be a finite number", value)
            return MISSING
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
            return MISSING
        return value

    def choice(self, path: str, choices: Sequence[str], kind: str, registry: Any = None) -> Any:
        """The value at `path` if it is one of `choices`. With a plugin `registry`, a name of a
        known plugin package that is not installed is reported with the package to install."""
        value = self.get(path)
        if value is MISSING:
            return MISSING
        if value not in choices:
            missing = registry.missing_hint(value) if isinstance(value, str) and registry else ""
            if missing:
                self.add(path, f"{missing}; installed: {list(choices)}", value)
            else:
                self.add(path, unknown_name(kind, value, choices), value)
            return MISSING
        return value

    def regex(self, path: str, value: Any) -> None:
        if not isinstance(value, str):
            self.add(path, "must be a regular expression (a string)", value)
            return
        try:
            re.compile(value)
        except re.error as error:
            self.add(path, f"is not a valid regular expression: {error}", value)


def bounds_message(low: Any, high: Any, op: str) -> str:
    if low is not None and high is not None:
        return f"must be in {low} {op} x {op} {high}"
    return f"must be >= {low}" if low is not None else f"must be <= {high}"


def unknown_name(kind: str, value: Any, choices: Sequence[str]) -> str:
    hint = difflib.get_close_matches(str(value), list(choices), n=1)
    maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {kind}{maybe}; allowed: {list(choices)}"


def error_message(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"
