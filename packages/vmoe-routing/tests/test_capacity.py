"""compute_capacity: ceil(K * C * S / E), with rounding options, a multiple-of, and clear errors."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmoe_routing import compute_capacity


def test_paper_formula_by_hand():
    # V-MoE S/32 at 224px: 49 patches + class token, 2 images a group -> S = 100 (say);
    # E=32, K=2, C=1.05: ceil(2 * 1.05 * 100 / 32) = ceil(6.5625) = 7.
    assert compute_capacity(100, 32, 2, 1.05) == 7


def test_rounding_modes():
    assert compute_capacity(100, 32, 2, 1.05, rounding="round") == 7
    assert compute_capacity(100, 32, 2, 1.05, rounding="floor") == 6
    assert compute_capacity(10, 4, 1, 1.0, rounding="round") == 2  # 2.5 rounds to even


def test_multiple_of_rounds_up():
    assert compute_capacity(100, 32, 2, 1.05, multiple_of=4) == 8
    assert compute_capacity(256, 8, 1, 1.0, multiple_of=4) == 32  # already a multiple


def test_capacity_never_exceeds_group_size():
    assert compute_capacity(10, 2, 2, 4.0) == 10


@given(
    s=st.integers(1, 4096),
    e=st.integers(1, 64),
    k=st.integers(1, 4),
    c=st.floats(0.01, 8.0),
)
def test_ceil_matches_formula(s, e, k, c):
    expected = min(math.ceil(k * c * s / e), s)
    assert compute_capacity(s, e, k, c) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
        (dict(capacity_factor=-1.0), "capacity_factor=-1.0 must be > 0"),
        (dict(group_size=0), "group_size=0 must be an integer >= 1"),
        (dict(num_experts=0), "num_experts=0 must be an integer >= 1"),
        (dict(k=0), "k=0 must be an integer >= 1"),
        (dict(rounding="up"), "rounding='up' must be one of"),
        (dict(multiple_of=0), "multiple_of=0 must be an integer >= 1"),
        (dict(capacity_factor=0.01, rounding="floor"), "rounds (floor) to 0 slots per expert"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    args = dict(group_size=16, num_experts=8, k=1, capacity_factor=1.0) | kwargs
    group_size, num_experts, k, c = (
        args.pop(n) for n in ("group_size", "num_experts", "k", "capacity_factor")
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compute_capacity(group_size, num_experts, k, c, **args)
