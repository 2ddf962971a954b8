"""Per-expert buffer capacity.

Each group of S tokens makes S*K token-choices. With E experts and capacity factor C, an expert's
buffer holds

    capacity = ceil(K * C * S / E)

slots per group (V-MoE, Section 2.2). C = 1 leaves room for a perfectly balanced router; C > 1
adds slack; C < 1 (with Batch Priority Routing) deliberately processes only part of the tokens.

The capacity is computed exactly, with C read as the decimal number the user wrote (1.1 is 11/10,
not the binary float 1.100000000000000088...): in floats, 1.1 * 200 / 4 is 55.00000000000001, and
a float ceil would give 56 slots where the formula says 55.
"""

from __future__ import annotations

import decimal
import math
import numbers
import operator
from fractions import Fraction

import numpy as np

from vmoe_plugins import checks

ROUNDINGS = ("ceil", "round", "floor")

_FACTOR_ALLOWED = "a finite number > 0 (int, float, NumPy float, Fraction or Decimal)"


def _positive_int(name: str, value: object) -> int:
    """`value` as a Python int, or a one-line ValueError unless it is an integer >= 1."""
    return checks.check_int(name, value, low=1)  # the shared rule: numpy ints yes, bools no


def _exact_factor(value: object) -> Fraction:
    """The capacity factor as the exact fraction of the decimal the user wrote.

    Floats go through their shortest round-tripping decimal string (`repr` for Python floats,
    `str` for NumPy floats, which NumPy also prints shortest), so 1.1 and np.float32(1.1) are both
    11/10. Ints, Fractions and Decimals are already exact.
    """
    # The shared rule (vmoe_plugins.checks): finite, not a bool; one message for every failure.
    if not (checks.is_number(value) and value > 0):
        raise ValueError(f"capacity_factor={value!r} must be {_FACTOR_ALLOWED}")
    if isinstance(value, decimal.Decimal):
        return Fraction(value)
    if isinstance(value, numbers.Integral):
        return Fraction(operator.index(value))
    if isinstance(value, numbers.Rational):
        return Fraction(value.numerator, value.denominator)
    # np.float64 subclasses float but its repr is "np.float64(1.1)"; str is the bare digits.
    # Python float subclasses may override both, so format the plain float instead.
    text = str(value) if isinstance(value, np.floating) else float.__repr__(float(value))
    return Fraction(text)


def compute_capacity(
    group_size: int,
    num_experts: int,
    k: int,
    capacity_factor: float | Fraction | decimal.Decimal,
    *,
    rounding: str = "ceil",
    multiple_of: int = 1,
) -> int:
    """Slots per expert per group: `rounding(k * capacity_factor * group_size / num_experts)`.

    The product is computed exactly (no float rounding), with `capacity_factor` read as the decimal
    number the user wrote: a float or NumPy float is taken at its shortest decimal representation,
    so 1.1 and np.float32(1.1) both mean exactly 11/10, and `compute_capacity(200, 4, 1, 1.1)` is
    ceil(55) = 55. Ints, `fractions.Fraction` and `decimal.Decimal` are used as they are.

    Args:
      group_size: S, tokens per routing group.
      num_experts: E.
      k: choices per token.
      capacity_factor: C > 0 and finite; an int, float, NumPy float, Fraction or Decimal.
      rounding: how the exact real-valued capacity becomes an integer: "ceil" (default), "floor",
        or "round", which rounds to the nearest integer with ties to even, as Python's `round`
        does (2.5 -> 2, 3.5 -> 4).
      multiple_of: round the result up to a multiple of this (the original V-MoE used 4, which
        suits TPU tiling). 1 means no extra rounding.

    Integer arguments may be Python or NumPy integers; bools are rejected everywhere.

    Returns:
      The capacity, at most `group_size`: an expert never receives a token of a group twice, so
      slots beyond S would always stay empty. The result is a multiple of `multiple_of` unless that
      would exceed `group_size`, in which case it is `group_size` (e.g. S=10, multiple_of=4 and an
      exact capacity of 9 give 10, not 12).

    Raises:
      ValueError: for a non-positive, non-integer or bool argument, a capacity factor that is not
        a finite number > 0, an unknown rounding, or a capacity that rounds below 1.
    """
    group_size = _positive_int("group_size", group_size)
    num_experts = _positive_int("num_experts", num_experts)
    k = _positive_int("k", k)
    factor = _exact_factor(capacity_factor)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} must be one of {ROUNDINGS}")
    multiple_of = _positive_int("multiple_of", multiple_of)

    exact = k * factor * group_size / num_experts
    # Fraction implements math.ceil/math.floor exactly and round() with ties to even.
    capacity = {"ceil": math.ceil, "round": round, "floor": math.floor}[rounding](exact)
    if capacity < 1:
        raise ValueError(
            f"capacity {k}*{capacity_factor}*{group_size}/{num_experts}={float(exact):.4g} rounds "
            f"({rounding}) to {capacity} slots per expert; it must be >= 1: raise "
            "capacity_factor or group_size, or use rounding='ceil'"
        )
    capacity += -capacity % multiple_of
    # The cap wins over multiple_of: slots beyond group_size could never be filled.
    return int(min(capacity, group_size))
