"""Which encoder blocks of a V-MoE are sparse: an explicit list, "every-n" or "last-n".

Blocks are 0-indexed. Following the V-MoE paper and its release:
  "every-2"  every other block, the odd ones: 1, 3, 5, ... ("every-n": blocks n-1, 2n-1, ...).
  "last-n"   the last n odd blocks (the paper's "last n even blocks", counting from 1): with 8
             blocks "last-2" is (5, 7); with 12 blocks it is (9, 11).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vmoe_plugins import is_int

FORMS = "'every-<n>', 'last-<n>' or a list of block indices"


def moe_block_indices(spec: str | Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """The sorted 0-indexed blocks that `spec` makes MoE in an encoder of `num_layers` blocks."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        match = re.fullmatch(r"(every|last)-(\d+)", spec)
        if not match or int(match.group(2)) < 1:
            raise ValueError(f"moe layers {spec!r} is not understood; allowed: {FORMS}, n >= 1")
        kind, n = match.group(1), int(match.group(2))
        if kind == "every":
            return tuple(range(n - 1, num_layers, n))
        odd = list(range(1, num_layers, 2))
        if n > len(odd):
            raise ValueError(
                f"moe layers 'last-{n}' needs {n} odd blocks but {num_layers} blocks have "
                f"{len(odd)}; allowed: last-1 .. last-{len(odd)}"
            )
        return tuple(odd[-n:])
    indices = tuple(spec)
    for i in indices:
        # The shared rule: numpy integers are indices too (returned as plain ints), bools not.
        if not is_int(i) or not 0 <= i < num_layers:
            raise ValueError(
                f"moe layer index {i!r} is out of range; allowed: integers 0 .. {num_layers - 1}"
            )
    indices = tuple(int(i) for i in indices)
    if len(set(indices)) != len(indices):
        raise ValueError(f"moe layers {list(indices)} name a block twice")
    return tuple(sorted(indices))
