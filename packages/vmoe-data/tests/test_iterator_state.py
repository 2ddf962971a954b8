"""The train iterator's state saves at step k and restores, in a new process, to batches k+1..."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

import vmoe_data

PIPELINE = dict(
    batch_size=16,
    pp="decode|randaug(2, 10)|random_crop(6)|flip_lr|value_range(-1, 1)|onehot(10)"
    "|mixup(0.5, groups=4, largest_first=True)",
    seed=11,
    process_index=0,
    process_count=1,
)

RESUME = """
import json, sys
import numpy as np
import pytest
import vmoe_data

pytestmark = pytest.mark.usefixtures("both_paths")
state_file, out_file = sys.argv[1:3]
iterator = iter(vmoe_data.train_pipeline("digits", **json.loads(sys.argv[3])))
iterator.set_state(json.load(open(state_file)))
batches = [next(iterator) for _ in range(5)]
np.savez(out_file, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
"""


def test_state_is_a_json_serialisable_position():
    iterator = iter(vmoe_data.train_pipeline("digits", **PIPELINE))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    assert json.loads(json.dumps(state)) == state


def test_restoring_in_a_new_process_continues_with_the_same_batches(tmp_path, run_python):
    iterator = iter(vmoe_data.train_pipeline("digits", **PIPELINE))
    for _ in range(7):  # k = 7
        next(iterator)
    (tmp_path / "state.json").write_text(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(5)]

    run_python(
        RESUME, str(tmp_path / "state.json"), str(tmp_path / "out.npz"), json.dumps(PIPELINE)
    )
    resumed = np.load(tmp_path / "out.npz")
    for i, batch in enumerate(expected):
        for key, value in batch.items():
            np.testing.assert_array_equal(resumed[f"{i}/{key}"], value)


def test_restored_state_differs_from_a_fresh_start():
    fresh = next(iter(vmoe_data.train_pipeline("digits", **PIPELINE)))
    iterator = iter(vmoe_data.train_pipeline("digits", **PIPELINE))
    next(iterator)
    state = iterator.get_state()
    restored = iter(vmoe_data.train_pipeline("digits", **PIPELINE))
    restored.set_state(state)
    assert not np.array_equal(next(restored)["id"], fresh["id"])


def test_state_counts_the_batches_read():
    iterator = iter(vmoe_data.train_pipeline("digits", **PIPELINE))
    for _ in range(3):
        next(iterator)
    assert iterator.get_state() == {"batches": 3}


@pytest.mark.parametrize(("saved_with", "restored_with"), [(0, 2), (2, 0)])
def test_state_restores_with_another_number_of_worker_processes(saved_with, restored_with):
    iterator = iter(vmoe_data.train_pipeline("digits", **PIPELINE, num_workers=saved_with))
    for _ in range(4):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = list(itertools.islice(iterator, 3))
    iterator.close()
    restored = iter(vmoe_data.train_pipeline("digits", **PIPELINE, num_workers=restored_with))
    restored.set_state(state)
    got = list(itertools.islice(restored, 3))
    restored.close()
    for a, b in zip(got, expected, strict=True):  # the same examples, randaug and mixup
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("state", [{"next_index": 3}, {"batches": -1}, {"batches": "3"}, [3]])
def test_a_state_that_is_not_from_get_state_is_an_error(state):
    iterator = iter(vmoe_data.train_pipeline("digits", **PIPELINE))
    with pytest.raises(ValueError, match=r"iterator state|batches="):
        iterator.set_state(state)


def test_eval_iterator_state_restores_too():
    options = dict(batch_size=100, pp="keep('id')", process_index=0, process_count=1)
    iterator = iter(vmoe_data.eval_pipeline("digits", **options))
    next(iterator)
    state = iterator.get_state()
    expected = [b["id"] for b in iterator]
    restored = iter(vmoe_data.eval_pipeline("digits", **options))
    restored.set_state(state)
    assert [b["id"].tolist() for b in restored] == [e.tolist() for e in expected]
