"""select_classes: the kept examples, their new labels, pipelines over them, bad classes."""

from __future__ import annotations

import numpy as np
import pytest

import vmoe_data


def _kept_by_loop(dataset, split, classes):
    """(parent index, new label) of every kept example, by walking the parent split."""
    source = dataset.source(split)
    kept = []
    for i in range(len(source)):
        label = int(source[i]["label"])
        if label in classes:
            kept.append((i, classes.index(label)))
    return kept


@pytest.mark.parametrize("classes", [(5, 6, 7, 8, 9), (3, 0), (9,)])
def test_keeps_exactly_the_examples_of_the_classes_relabelled_in_order(digits, classes):
    selected = vmoe_data.select_classes(digits, classes)
    assert selected.num_classes == len(classes)
    assert selected.class_names == tuple(str(c) for c in classes)
    for split in digits.splits:
        kept = _kept_by_loop(digits, split, list(classes))
        source = selected.source(split)
        assert selected.num_examples(split) == len(source) == len(kept)
        np.testing.assert_array_equal(selected.labels(split), [new for _, new in kept])
        parent = digits.source(split)
        for i in (0, len(kept) // 2, len(kept) - 1):
            original, new = kept[i]
            assert int(source[i]["label"]) == new
            np.testing.assert_array_equal(source[i]["image"], parent[original]["image"])


def test_slices_apply_after_the_selection(digits):
    selected = vmoe_data.select_classes(digits, (0, 1, 2, 3, 4))
    n = selected.num_examples("train")
    np.testing.assert_array_equal(selected.labels("train[10:20]"), selected.labels("train")[10:20])
    assert selected.num_examples("train[:50%]") == round(n / 2)


def test_in_memory_and_per_example_batches_agree(digits, both_paths):
    selected = vmoe_data.select_classes(digits, (7, 2, 5))
    held = vmoe_data.cache.in_memory(selected.source("validation"), None)
    np.testing.assert_array_equal(held.arrays["label"], selected.labels("validation"))
    batches = vmoe_data.eval_pipeline(
        selected, split="validation", batch_size=16, pp="decode|value_range(-1, 1)"
    )
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, selected.labels("validation"))
    assert set(labels.tolist()) == {0, 1, 2}


def test_train_batches_hold_only_the_new_labels(digits, both_paths):
    selected = vmoe_data.select_classes(digits, (5, 6, 7, 8, 9))
    pipeline = vmoe_data.train_pipeline(
        selected, batch_size=32, pp="decode|value_range(-1, 1)|onehot(5)", seed=0
    )
    it = iter(pipeline)
    for _ in range(25):  # more than one epoch of 625 examples
        batch = next(it)
        assert batch["labels"].shape == (32, 5)
        np.testing.assert_array_equal(batch["labels"].sum(axis=1), 1.0)


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ((), "non-empty sequence"),
        ((10,), r"classes \[10\] are outside \[0, 10\)"),
        ((-1, 2), r"classes \[-1\] are outside"),
        ((1, 2, 1), r"classes \[1\] are named twice"),
        ((True,), "distinct ints"),
        ((1.0,), "distinct ints"),
        ("01", "distinct ints"),
        (3, "distinct ints"),
    ],
)
def test_bad_classes_are_named(digits, classes, message):
    with pytest.raises(ValueError, match=message):
        vmoe_data.select_classes(digits, classes)


def test_each_splits_labels_are_read_once():
    reads = []
    labels = np.array([0, 1, 2, 1, 0, 2, 2])
    arrays = {"image": np.zeros((7, 2, 2, 1), np.uint8), "label": labels}

    def read_labels(split):
        reads.append(split)
        return labels

    parent = vmoe_data.Dataset(
        "tiny", 3, {"train": 7}, lambda split: vmoe_data.ArraySource(arrays), (), read_labels
    )
    selected = vmoe_data.select_classes(parent, (2, 0))
    assert selected.num_examples("train") == 5
    np.testing.assert_array_equal(selected.labels("train"), [1, 0, 1, 0, 0])
    source = selected.source("train")
    assert [int(source[i]["label"]) for i in range(len(source))] == [1, 0, 1, 0, 0]
    assert reads == ["train"]
