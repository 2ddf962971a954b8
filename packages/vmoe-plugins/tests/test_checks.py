"""The shared option checks: one rule per kind of value, numpy scalars as Python ones, bools
never passing as numbers, one-line errors naming the argument, the value and what is allowed."""

import decimal
import fractions

import numpy as np
import pytest

from vmoe_plugins import check_bool, check_choice, check_int, check_number, check_str


@pytest.mark.parametrize("value", [4, np.int64(4), np.int32(4), np.uint8(4)])
def test_int_accepts_python_and_numpy_integers(value):
    result = check_int("capacity_multiple_of", value, low=1)
    assert result == 4 and type(result) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 4.0, "4", None, np.float32(4)])
def test_int_refuses_bools_floats_and_strings(value):
    with pytest.raises(ValueError, match=r"^k=.* must be an integer >= 1$"):
        check_int("k", value, low=1)


def test_int_bounds_are_in_the_message():
    with pytest.raises(ValueError, match=r"resize: size=0 must be an integer in \[1, 8\]"):
        check_int("size", 0, low=1, high=8, where="resize: ")
    with pytest.raises(ValueError, match=r"seed=-1 must be an integer >= 0"):
        check_int("seed", -1, low=0)
    assert check_int("x", -5) == -5


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.5), np.float64(2.0), np.int64(3)])
def test_number_accepts_python_and_numpy_reals(value):
    assert check_number("capacity_factor", value, above=0) == value


@pytest.mark.parametrize("value", [True, np.bool_(False), "1.0", None, float("nan"), float("inf")])
def test_number_refuses_bools_strings_and_non_finite(value):
    with pytest.raises(ValueError, match=r"noise_std=.* must be a finite number >= 0$"):
        check_number("noise_std", value, at_least=0)


def test_number_bounds():
    with pytest.raises(ValueError, match=r"capacity_factor=0 must be a finite number > 0"):
        check_number("capacity_factor", 0, above=0)
    with pytest.raises(ValueError, match=r"p=1.5 must be a finite number >= 0 and <= 1"):
        check_number("p", 1.5, at_least=0, at_most=1)
    assert check_number("p", fractions.Fraction(1, 2), at_most=1) == fractions.Fraction(1, 2)


def test_bool_accepts_only_bools():
    assert check_bool("shuffle", np.bool_(True)) is True
    for value in (1, "yes", None):
        with pytest.raises(ValueError, match=r"shuffle=.* must be True or False"):
            check_bool("shuffle", value)


def test_str_and_choice():
    assert check_str("name", "digits") == "digits"
    with pytest.raises(ValueError, match="name='' must be a non-empty string"):
        check_str("name", "")
    assert check_choice("rounding", "ceil", ("ceil", "floor")) == "ceil"
    with pytest.raises(ValueError, match=r"rounding='up' must be one of \('ceil', 'floor'\)"):
        check_choice("rounding", "up", ("ceil", "floor"))
    with pytest.raises(ValueError, match=r"level=True must be one of \(0, 1\)"):
        check_choice("level", True, (0, 1))


def test_a_huge_int_is_refused_with_the_value_error_not_an_overflow():
    # math.isfinite(10**400) raised OverflowError.
    with pytest.raises(ValueError, match=r"^x=1000+ must be a finite number$"):
        check_number("x", 10**400)
    with pytest.raises(ValueError, match=r"must be a finite number > 0$"):
        check_number("x", fractions.Fraction(10**400, 3), above=0)


def test_decimals_and_fractions_are_numbers():
    # A Decimal was refused although compute_capacity takes it.
    assert check_number("capacity_factor", decimal.Decimal("1.1"), above=0) == decimal.Decimal(
        "1.1"
    )
    assert check_number("c", fractions.Fraction(11, 10), above=0) == fractions.Fraction(11, 10)
    for bad in ("NaN", "Infinity", "-Infinity", "sNaN", "1e400"):
        with pytest.raises(ValueError, match=r"must be a finite number > 0$"):
            check_number("capacity_factor", decimal.Decimal(bad), above=0)
    with pytest.raises(
        ValueError, match=r"capacity_factor=Decimal\('-1'\) must be a finite number > 0"
    ):
        check_number("capacity_factor", decimal.Decimal("-1"), above=0)
