"""Per-expert buffer capacity.

Each group of S tokens makes S*K token-choices. With E experts and capacity factor C, an expert's
buffer holds

    capacity = ceil(K * C * S / E)

slots per group (V-MoE, Section 2.2). C = 1 leaves room for a perfectly balanced router; C > 1
adds slack; C < 1 (with Batch Priority Routing) deliberately processes only part of the tokens.
"""

from __future__ import annotations

import math
import numbers

ROUNDINGS = ("ceil", "round", "floor")


def compute_capacity(
    group_size: int,
    num_experts: int,
    k: int,
    capacity_factor: float,
    *,
    rounding: str = "ceil",
    multiple_of: int = 1,
) -> int:
    """Slots per expert per group: `rounding(k * capacity_factor * group_size / num_experts)`.

    Args:
      group_size: S, tokens per routing group.
      num_experts: E.
      k: choices per token.
      capacity_factor: C > 0.
      rounding: "ceil" (default), "round" or "floor" of the real-valued capacity.
      multiple_of: round the result up to a multiple of this (the original V-MoE used 4, which
        suits TPU tiling). 1 means no extra rounding.

    Returns:
      The capacity, at most `group_size`: an expert never receives a token of a group twice, so
      slots beyond S would always stay empty.

    Raises:
      ValueError: for a non-positive argument, an unknown rounding, or a capacity below 1.
    """
    for name, value in (("group_size", group_size), ("num_experts", num_experts), ("k", k)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} must be one of {ROUNDINGS}")
    if not isinstance(multiple_of, numbers.Integral) or multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of!r} must be an integer >= 1")
    exact = k * capacity_factor * group_size / num_experts
    capacity = {"ceil": math.ceil, "round": round, "floor": math.floor}[rounding](exact)
    if capacity < 1:
        raise ValueError(
            f"capacity {k}*{capacity_factor}*{group_size}/{num_experts}={exact:.4g} rounds "
            f"({rounding}) to {capacity} slots per expert; it must be >= 1: raise "
            "capacity_factor or group_size, or use rounding='ceil'"
        )
    capacity += -capacity % multiple_of
    return int(min(capacity, group_size))
