"""Argument checks shared by datasets, ops and pipelines: one rule per kind of value.

Ints are Python or numpy ints, never bools; numbers are ints or floats (finite), never bools;
bools are Python or numpy bools. Every failure is a one-line ValueError that names the argument,
the value and what is allowed, prefixed with `where` (e.g. "resize: ").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def check_int(
    name: str, value: Any, low: int | None = None, high: int | None = None, where: str = ""
) -> int:
    """`value` as an int, checked to be an int (not a bool) in [low, high]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where}{name}={value!r} must be an int{_bounds(low, high)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{where}{name}={value!r} must be an int{_bounds(low, high)}")
    return int(value)


def check_number(name: str, value: Any, where: str = "") -> Any:
    """`value`, checked to be a finite int or float (not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"{where}{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{where}{name}={value!r} must be a finite number")
    return value


def check_bool(name: str, value: Any, where: str = "") -> bool:
    """`value` checked to be True or False (not a truthy string or number)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}{name}={value!r} must be True or False")
    return bool(value)


def check_str(name: str, value: Any, where: str = "") -> str:
    """`value` checked to be a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}{name}={value!r} must be a non-empty string")
    return value


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""
