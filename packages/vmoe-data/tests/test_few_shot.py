"""Few-shot sampling: n examples per class, drawn with a seed."""

from __future__ import annotations

import numpy as np
import pytest

import vmoe_data

pytestmark = pytest.mark.usefixtures("both_paths")

LABELS = np.repeat(np.arange(4), [5, 6, 7, 8])


def test_draws_shots_examples_of_every_class():
    chosen = vmoe_data.few_shot_indices(LABELS, shots=3, seed=0)
    np.testing.assert_array_equal(np.bincount(LABELS[chosen]), [3, 3, 3, 3])
    assert len(set(chosen.tolist())) == 12
    assert chosen.tolist() == sorted(chosen.tolist())


def test_same_seed_same_draw_other_seed_other_draw():
    a = vmoe_data.few_shot_indices(LABELS, shots=2, seed=4)
    np.testing.assert_array_equal(a, vmoe_data.few_shot_indices(LABELS, shots=2, seed=4))
    assert not np.array_equal(a, vmoe_data.few_shot_indices(LABELS, shots=2, seed=5))


def test_every_example_of_a_class_can_be_drawn():
    drawn = {i for s in range(50) for i in vmoe_data.few_shot_indices(LABELS, 1, seed=s).tolist()}
    assert drawn == set(range(len(LABELS)))


def test_class_with_too_few_examples_is_an_error():
    with pytest.raises(ValueError, match=r"class 0 has 5 examples, fewer than shots=6"):
        vmoe_data.few_shot_indices(LABELS, shots=6)


def test_missing_class_is_an_error_when_num_classes_says_it_exists():
    with pytest.raises(ValueError, match=r"class 4 has 0 examples"):
        vmoe_data.few_shot_indices(LABELS, shots=1, num_classes=5)


@pytest.mark.parametrize("shots", [0, -1, 1.5])
def test_bad_shots_is_an_error(shots):
    with pytest.raises(ValueError, match="shots="):
        vmoe_data.few_shot_indices(LABELS, shots=shots)


def test_few_shot_pipeline_gives_shots_per_class_masked(digits):
    batches = list(
        vmoe_data.few_shot_pipeline(
            "digits", shots=5, batch_size=16, seed=1, process_index=0, process_count=1
        )
    )
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [5] * 10)
    assert len(batches) == 4  # ceil(50 / 16)


def test_few_shot_pipeline_is_seeded(digits):
    def chosen(seed):
        pipeline = vmoe_data.few_shot_pipeline(
            "digits", shots=2, batch_size=20, seed=seed, process_index=0, process_count=1
        )
        return [int(i) for b in pipeline for i in b["id"][b["mask"]]]

    assert chosen(3) == chosen(3)
    assert chosen(3) != chosen(4)


def test_labels_outside_the_classes_are_an_error():
    with pytest.raises(ValueError, match=r"labels \[-1, 5\] are outside \[0, num_classes=2\)"):
        vmoe_data.few_shot_indices(np.array([0, 1, 5, -1, 0, 1]), shots=1, num_classes=2)


def test_numpy_ints_are_accepted_for_shots_and_seed():
    labels = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(
        vmoe_data.few_shot_indices(labels, np.int64(1), np.int64(3)),
        vmoe_data.few_shot_indices(labels, 1, 3),
    )


@pytest.mark.parametrize(("option", "value"), [("shots", True), ("seed", 1.0)])
def test_bools_and_floats_are_not_ints(option, value):
    with pytest.raises(ValueError, match=rf"{option}={value!r} must be an integer"):
        vmoe_data.few_shot_indices(np.array([0, 1]), **{"shots": 1, option: value})
