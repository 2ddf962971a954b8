"""pp specs: ops chained from a string or a list, with clear errors for bad specs."""

from __future__ import annotations

import numpy as np
import pytest

import vmoe_data
import vmoe_plugins
from vmoe_data.preprocess import _parse_op, _split_spec


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
    assert _parse_op('resize((4, 6), method="nearest")') == (
        "resize",
        ((4, 6),),
        {"method": "nearest"},
    )
    assert _parse_op("flip_lr") == ("flip_lr", (), {})


def test_pipes_inside_quotes_or_parentheses_do_not_split():
    assert _split_spec("keep('a|b')|resize((2, 2))") == ["keep('a|b')", "resize((2, 2))"]


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
    with pytest.raises(ValueError, match=r"resize: size=-2 must be a positive integer"):
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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("value_range('a', 1)", r"value_range: vmin='a' must be a finite number"),
        ("flip_lr('x')", r"flip_lr: probability='x' must be a finite number"),
        ("inception_crop(area_min='5')", r"inception_crop: area_min='5' must be a finite number"),
        ("mixup(alpha='x')", r"mixup: alpha='x' must be a finite number"),
        ("mixup(keys=[1])", r"mixup: keys=\[1\] must be a non-empty list of feature names"),
        ("resize(True)", r"resize: size=True must be a positive integer or \(height, width\)"),
        ("resize((4, True))", r"resize: size=\(4, True\) must be a positive int"),
        ("resize('ab')", r"resize: size='ab' must be a positive int"),
        ("resize(3, method=[1])", r"resize: method=\[1\] is not one of"),
        ("resize_small((3, 4))", r"resize_small: size=\(3, 4\) must be an integer >= 1"),
        ("normalize(mean='x')", r"normalize: mean='x' must be a number or a list of numbers"),
        ("normalize(std=[])", r"normalize: std=\[\] must be a number or a list of numbers"),
        ("onehot(10, on='x')", r"onehot: on='x' must be a finite number"),
        ("onehot(True)", r"onehot: depth=True must be an integer >= 1"),
        ("onehot(10, key=3)", r"onehot: key=3 must be a non-empty string"),
        ("decode(key=None)", r"decode: key=None must be a non-empty string"),
    ],
)
def test_bad_argument_types_are_one_line_errors_naming_the_op(text, message):
    with pytest.raises(ValueError, match=rf"^pp op .*{message}") as error:
        vmoe_data.preprocess(text)
    assert "\n" not in str(error.value)


def test_unhashable_dict_key_is_a_literal_error():
    with pytest.raises(ValueError, match=r"pp op 'resize\(\{\[1\]: 2\}\)': arguments must be"):
        vmoe_data.preprocess("resize({[1]: 2})")


def test_a_type_error_inside_a_plugin_factory_becomes_a_value_error_naming_the_op():
    class Plugin:
        @vmoe_plugins.hookimpl
        def vmoe_preprocess_ops(self):
            def shift(amount=1):
                offset = amount + 1  # 'x' + 1: TypeError
                return lambda example, rng: {**example, "offset": offset}

            return {"shift_test_op": shift}

    name = vmoe_plugins.register_plugin(Plugin(), name="type_error_plugin")
    try:
        with pytest.raises(ValueError, match=r"^pp op \"shift_test_op\('x'\)\": shift_test_op: "):
            vmoe_data.preprocess("shift_test_op('x')")
    finally:
        vmoe_plugins.unregister_plugin(name)
