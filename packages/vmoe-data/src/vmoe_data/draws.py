"""Per-example random numbers for whole batches: counter-based, so vectorised ops can use them.

The per-example path gives every example its own `np.random.Generator` (seeded by the example's
position in the stream). Creating a generator costs more than an 8x8 image's whole
preprocessing, and cannot be vectorised. A vectorised op instead asks `Draws` for one number per
example of the batch at once; each number is a hash of (pipeline key, example id, op stream,
draw counter), so it depends on the example and never on the batch it sits in, the batch size
or the process count. The hash is SplitMix64's finaliser (Steele, Lea and Flood 2014), which
passes BigCrush as a counter-based generator; plenty for augmentation.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_UNIT = 2.0**-53


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _combine(state: np.ndarray, value: int | np.ndarray) -> np.ndarray:
    return _mix(state + _GOLDEN + np.asarray(value, dtype=np.uint64))


class Draws:
    """Random numbers for one op over a batch: row j belongs to the example with id `ids[j]`.

    Args:
      key: the pipeline's seed for this kind of randomness (an int in [0, 2**64)).
      ids: int [L], one id per example of the batch (its position in the pipeline's stream).
      stream: which op of the spec is drawing (ops never share numbers).

    Every call draws fresh numbers: the k-th call of an op gives example i the same numbers in
    any batch and on any process.
    """

    def __init__(self, key: int, ids: np.ndarray, stream: int) -> None:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"Draws: ids must be a 1-D int array; got {ids.dtype} {ids.shape}")
        with np.errstate(over="ignore"):
            base = _combine(np.full(ids.shape, key, dtype=np.uint64), ids.astype(np.uint64))
            self._base = _combine(base, stream)
        self._count = 0

    def __len__(self) -> int:
        return len(self._base)

    def _bits(self, size: int | None) -> np.ndarray:
        """Fresh uint64 [L] (size None) or [L, size] hashes."""
        columns = 1 if size is None else size
        counters = np.arange(self._count, self._count + columns, dtype=np.uint64)
        self._count += columns
        with np.errstate(over="ignore"):
            bits = _combine(self._base[:, None], counters[None, :])
        return bits[:, 0] if size is None else bits

    def uniform(self, low: float = 0.0, high: float = 1.0, size: int | None = None) -> np.ndarray:
        """float64 [L] (or [L, size]) uniform in [low, high)."""
        unit = (self._bits(size) >> np.uint64(11)).astype(np.float64) * _UNIT
        return low + (high - low) * unit

    def integers(self, low: np.ndarray | int, high: np.ndarray | int) -> np.ndarray:
        """int64 [L] uniform in [low, high) per example (`low`, `high`: ints or [L] arrays)."""
        low = np.broadcast_to(np.asarray(low, dtype=np.int64), (len(self),))
        high = np.broadcast_to(np.asarray(high, dtype=np.int64), (len(self),))
        if np.any(high <= low):
            raise ValueError(f"Draws.integers: need low < high; got {low} and {high}")
        span = (high - low).astype(np.float64)
        return low + np.minimum(np.floor(self.uniform() * span), span - 1).astype(np.int64)
