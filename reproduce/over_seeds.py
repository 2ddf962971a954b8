"""Numbers over seeds and how the reproduction's tables and sentences write them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np


def stats(values: Iterable[float]) -> dict[str, float]:
    """{"mean", "std" (sample, ddof=1; 0 for one value), "n"} of `values`."""
    array = np.asarray(list(values), dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "n": len(array),
    }


def difference(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float | None]:
    """(mean a - mean b, the seeds' spread of that difference, sqrt(std_a^2 + std_b^2)), both
    in points; the spread is None with one seed."""
    spread = math.hypot(a["std"], b["std"]) * 100 if min(a["n"], b["n"]) > 1 else None
    return (a["mean"] - b["mean"]) * 100, spread


def versus(a: Mapping[str, float], b: Mapping[str, float], name: str) -> str:
    """ "level with NAME (B%; +0.3 points, within the seeds' spread of 1.2)", or "1.5 points
    above / below NAME (B%)"."""
    gap, spread = difference(a, b)
    side = "above" if gap > 0 else "below"
    if spread is None:
        return f"{abs(gap):.1f} points {side} {name} ({pct(b)}; one seed: no spread)"
    if abs(gap) <= spread:
        return (
            f"level with {name} ({pct(b)}; {gap:+.1f} points, within the seeds' spread "
            f"of {spread:.1f})"
        )
    return f"{abs(gap):.1f} points {side} {name} ({pct(b)})"


def pct(values: Mapping[str, float]) -> str:
    return f"{values['mean'] * 100:.1f}%"


def span(values: list[int]) -> str:
    """ "2000", or "1928-2062" where the seeds' values differ."""
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def pm(values: Mapping[str, float], scale: float = 100.0, digits: int = 1) -> str:
    """ "96.5 ± 1.1": mean ± std, scaled (100: a fraction in %)."""
    return f"{values['mean'] * scale:.{digits}f} ± {values['std'] * scale:.{digits}f}"
