"""pp specs: ops chained from a string or a list, with clear errors for bad specs."""

from __future__ import annotations

import numpy as np
import pytest

import vmoe_data
from vmoe_data.preprocess import parse_op, split_spec


def _example(h=8, w=8, c=1):
    return {"image": np.arange(h * w * c, dtype=np.uint8).reshape(h, w, c), "label": np.int64(3)}


def test_string_spec_applies_ops_in_order():
    pp = vmoe_data.preprocess("resize(4)|value_range(0, 1)|onehot(10)")
    out = pp(_example(), np.random.default_rng(0))
    assert out["image"].shape == (4, 4, 1)
    assert out["image"].dtype == np.float32
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    np.testing.assert_array_equal(out["labels"], np.eye(10)[3])


def test_list_spec_mixes_strings_and_callables():
    def double_label(example, rng):
        return {**example, "label": example["label"] * 2}

    pp = vmoe_data.preprocess(["resize(2)", double_label])
    out = pp(_example(), None)
    assert out["image"].shape == (2, 2, 1)
    assert out["label"] == 6
    assert pp.spec == "resize(2)|double_label"


def test_empty_spec_and_none_are_identity():
    example = _example()
    assert vmoe_data.preprocess(None)(example, None) is example
    assert vmoe_data.preprocess("")(example, None) is example


def test_keyword_and_positional_arguments_are_python_literals():
    assert parse_op('resize((4, 6), method="nearest")') == (
        "resize",
        ((4, 6),),
        {"method": "nearest"},
    )
    assert parse_op("flip_lr") == ("flip_lr", (), {})


def test_pipes_inside_quotes_or_parentheses_do_not_split():
    assert split_spec("keep('a|b')|resize((2, 2))") == ["keep('a|b')", "resize((2, 2))"]


def test_batch_ops_are_applied_by_apply_batch_only():
    pp = vmoe_data.preprocess("value_range(0, 1)|onehot(2)|mixup(1.0)")
    assert [t for t, _ in pp.example_ops] == ["value_range(0, 1)", "onehot(2)"]
    assert [t for t, _ in pp.batch_ops] == ["mixup(1.0)"]


def test_example_op_after_a_batch_op_is_an_error():
    with pytest.raises(ValueError, match=r"'flip_lr' works on single examples but comes after"):
        vmoe_data.preprocess("value_range|onehot(2)|mixup|flip_lr")


def test_unknown_op_lists_the_installed_ops():
    with pytest.raises(ValueError, match=r"unknown preprocess op 'rezise' \(did you mean 'resize'"):
        vmoe_data.preprocess("decode|rezise(3)")


def test_wrong_arguments_name_the_op_and_its_signature():
    with pytest.raises(ValueError, match=r"pp op 'resize\(3, colour=1\)'.*signature: resize\(size"):
        vmoe_data.preprocess("resize(3, colour=1)")


def test_missing_required_argument_is_an_error():
    with pytest.raises(ValueError, match=r"pp op 'onehot'.*missing a required argument: 'depth'"):
        vmoe_data.preprocess("onehot")


def test_bad_argument_value_is_an_error_naming_the_value():
    with pytest.raises(ValueError, match=r"resize: size=-2 must be a positive int"):
        vmoe_data.preprocess("resize(-2)")


def test_non_literal_arguments_are_an_error():
    with pytest.raises(ValueError, match="arguments must be Python literals"):
        vmoe_data.preprocess("resize(os.getcwd())")


@pytest.mark.parametrize("text", ["resize(", "3(4)", "a.b(1)", "resize(**x)"])
def test_malformed_op_text_is_an_error(text):
    with pytest.raises(ValueError, match=r"bad pp op|literals"):
        vmoe_data.preprocess(text)


def test_spec_of_the_wrong_type_is_an_error():
    with pytest.raises(ValueError, match="must be a string like"):
        vmoe_data.preprocess(3)
