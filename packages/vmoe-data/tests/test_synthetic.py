"""The synthetic dataset: random images generated per index, the same on every call."""

from __future__ import annotations

import numpy as np
import pytest

import vmoe_data


def test_examples_have_the_requested_shape_and_labels():
    dataset = vmoe_data.get_dataset("synthetic", image_size=32, num_classes=7, num_train=20)
    example = dataset.source("train")[9]
    assert example["image"].shape == (32, 32, 3)
    assert example["image"].dtype == np.uint8
    assert int(example["label"]) == 9 % 7
    np.testing.assert_array_equal(dataset.labels("train"), np.arange(20) % 7)


def test_same_index_same_pixels_across_calls_and_splits_differ():
    a = vmoe_data.get_dataset("synthetic", image_size=8)
    b = vmoe_data.get_dataset("synthetic", image_size=8)
    np.testing.assert_array_equal(a.source("train")[5]["image"], b.source("train")[5]["image"])
    assert not np.array_equal(a.source("train")[5]["image"], a.source("test")[5]["image"])


@pytest.mark.parametrize("option", [{"image_size": 0}, {"num_classes": -1}, {"seed": -2}])
def test_bad_options_are_errors(option):
    with pytest.raises(ValueError, match=f"{next(iter(option))}="):
        vmoe_data.get_dataset("synthetic", **option)


@pytest.mark.parametrize("option", [{"image_size": True}, {"channels": 3.0}, {"seed": "1"}])
def test_options_of_the_wrong_type_are_errors(option):
    (name, value), *_ = option.items()
    with pytest.raises(
        ValueError, match=rf"synthetic dataset: {name}={value!r} must be an integer"
    ):
        vmoe_data.get_dataset("synthetic", **option)
