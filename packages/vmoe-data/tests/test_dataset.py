"""Datasets, sources and split strings."""

from __future__ import annotations

import numpy as np
import pytest

import vmoe_data
from vmoe_data import ArraySource, Dataset, IndexedSource


def _toy(n=10) -> Dataset:
    arrays = {
        "image": np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1),
        "label": np.arange(n) % 3,
    }
    return Dataset("toy", 3, {"train": n}, lambda split: ArraySource(arrays))


def test_array_source_gives_one_row_per_index():
    source = ArraySource({"image": np.zeros((5, 2, 2, 1)), "label": np.arange(5)})
    assert len(source) == 5
    assert source[3]["label"] == 3
    assert source[-1]["label"] == 4


def test_array_source_rejects_arrays_of_different_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        ArraySource({"image": np.zeros((5, 2)), "label": np.arange(4)})


def test_array_source_index_out_of_range_is_an_index_error():
    with pytest.raises(IndexError, match="out of range"):
        ArraySource({"label": np.arange(3)})[3]


def test_indexed_source_reads_the_chosen_rows():
    source = IndexedSource(ArraySource({"label": np.arange(10) * 10}), [7, 2])
    assert [source[i]["label"] for i in range(len(source))] == [70, 20]


@pytest.mark.parametrize(
    ("split", "labels"),
    [
        ("train", list(range(10))),
        ("train[:3]", [0, 1, 2]),
        ("train[7:]", [7, 8, 9]),
        ("train[-2:]", [8, 9]),
        ("train[10%:30%]", [1, 2]),
    ],
)
def test_split_slices_select_examples_in_order(split, labels):
    source = _toy().source(split)
    assert [int(source[i]["image"][0, 0, 0]) // 4 for i in range(len(source))] == labels


def test_labels_of_a_sliced_split(digits):
    np.testing.assert_array_equal(digits.labels("test[:5]"), digits.labels("test")[:5])


def test_unknown_split_names_the_dataset_and_its_splits(digits):
    with pytest.raises(ValueError, match=r"unknown split 'dev' of dataset 'digits'.*'test'"):
        digits.source("dev")


@pytest.mark.parametrize("split", ["train[:x]", "train[1]", "train[5:2]", "tr ain", ""])
def test_malformed_or_empty_split_strings_are_errors(split):
    with pytest.raises(ValueError, match=r"split|slice"):
        _toy().source(split)


def test_parse_split():
    assert vmoe_data.parse_split("train[:10%]") == ("train", ("", "10%"))
    assert vmoe_data.parse_split("test") == ("test", None)


def test_num_examples_counts_slices():
    assert _toy().num_examples("train[:4]") == 4
