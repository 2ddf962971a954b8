"""Option checks shared by every vmoe package: one rule per kind of value, one message shape.

Plugins build their objects from options that come from Python, numpy, command lines and config
files, so the same value must be judged the same way everywhere:

- integers: Python or numpy integers (anything `numbers.Integral`), never bools;
- numbers: integers, reals (Python or numpy floats, `fractions.Fraction`) or `decimal.Decimal`s,
  finite (as a float too: 10**400 is refused), never bools;
- bools: True/False (Python or numpy), never a truthy string or number;
- strings: non-empty `str`; choices: one of a fixed tuple.

Every failure is a one-line ValueError naming the argument, its value and what is allowed,
prefixed with `where` (e.g. "resize: "). numpy is recognised without being imported.
"""

from __future__ import annotations

import decimal
import math
import numbers
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def is_bool(value: Any) -> bool:
    """True for Python and numpy bools (numpy's are not `bool` subclasses)."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in _NP_BOOLS)


_NP_BOOLS = ("bool_", "bool")


def is_int(value: Any) -> bool:
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_number(value: Any) -> bool:
    """True for finite Python/numpy integers and reals, Fractions and Decimals; False for bools.

    Finite means finite as a float too: an int or Fraction too large for a float (10**400) is
    refused, not an OverflowError.
    """
    if is_bool(value) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        return False
    if isinstance(value, decimal.Decimal) and not value.is_finite():
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, ValueError):
        return False


def check_int(
    name: str, value: Any, low: int | None = None, high: int | None = None, where: str = ""
) -> int:
    """`value` as a Python int, checked to be an integer (not a bool) in [low, high]."""
    ok = is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise ValueError(f"{where}{name}={value!r} must be an integer{_bounds(low, high)}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    where: str = "",
) -> Any:
    """`value` unchanged, checked to be a finite number (not a bool) in the given bounds.

    `above` is a strict lower bound (`above=0`: positive), `at_least` and `at_most` inclusive.
    """
    ok = (
        is_number(value)
        and (above is None or value > above)
        and (at_least is None or value >= at_least)
        and (at_most is None or value <= at_most)
    )
    if not ok:
        bounds = [f"> {above}"] if above is not None else []
        bounds += [f">= {at_least}"] if at_least is not None else []
        bounds += [f"<= {at_most}"] if at_most is not None else []
        suffix = f" {' and '.join(bounds)}" if bounds else ""
        raise ValueError(f"{where}{name}={value!r} must be a finite number{suffix}")
    return value


def check_bool(name: str, value: Any, where: str = "") -> bool:
    """`value` as a bool, checked to be True or False (not a truthy string or number)."""
    if not is_bool(value):
        raise ValueError(f"{where}{name}={value!r} must be True or False")
    return bool(value)


def check_str(name: str, value: Any, where: str = "") -> str:
    """`value`, checked to be a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}{name}={value!r} must be a non-empty string")
    return value


def check_choice(name: str, value: T, choices: Sequence[Any], where: str = "") -> T:
    """`value`, checked to be one of `choices` (a bool never matches 0 or 1)."""
    if not any(value == c and is_bool(value) == is_bool(c) for c in choices):
        raise ValueError(f"{where}{name}={value!r} must be one of {tuple(choices)}")
    return value


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""
