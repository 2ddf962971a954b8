"""Which blocks are MoE: explicit lists, "every-n" and the paper's "last-n" (odd blocks)."""

from __future__ import annotations

import pytest

from vmoe_layers import moe_block_indices


@pytest.mark.parametrize(
    "spec, num_layers, expected",
    [
        ("every-2", 8, (1, 3, 5, 7)),
        ("every-2", 12, (1, 3, 5, 7, 9, 11)),
        ("every-3", 12, (2, 5, 8, 11)),
        ("every-1", 3, (0, 1, 2)),
        ("last-2", 8, (5, 7)),  # V-MoE-S/32 "last 2": blocks 5 and 7
        ("last-2", 12, (9, 11)),
        ("last-5", 32, (23, 25, 27, 29, 31)),  # V-MoE-H/14 "last 5"
        ("last-4", 8, (1, 3, 5, 7)),
        ([7, 0, 3], 8, (0, 3, 7)),
        ((), 8, ()),
        (None, 8, ()),
    ],
)
def test_block_indices(spec, num_layers, expected):
    assert moe_block_indices(spec, num_layers) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("last-5", r"'last-5' needs 5 odd blocks but 8 blocks have 4; allowed: last-1 .. last-4"),
        ("first-2", r"moe layers 'first-2' is not understood; allowed: 'every-<n>', 'last-<n>'"),
        ("every-0", r"'every-0' is not understood"),
        ([8], r"moe layer index 8 is out of range; allowed: integers 0 .. 7"),
        ([-1], r"moe layer index -1 is out of range"),
        ([1, 1], r"moe layers \[1, 1\] name a block twice"),
    ],
)
def test_bad_specs_are_rejected(spec, message):
    with pytest.raises(ValueError, match=message):
        moe_block_indices(spec, 8)
