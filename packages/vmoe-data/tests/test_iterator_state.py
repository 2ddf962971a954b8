"""The train iterator's state saves at step k and restores, in a new process, to batches k+1..."""

from __future__ import annotations

import itertools
import json

import numpy as np

import vmoe_data

PIPELINE = dict(
    batch_size=16,
    pp="decode|random_crop(6)|flip_lr|value_range(-1, 1)|onehot(10)|mixup(0.5)",
    seed=11,
    process_index=0,
    process_count=1,
)

RESUME = """
import json, sys
import numpy as np
import vmoe_data
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


def test_state_restores_with_worker_processes():
    options = {**PIPELINE, "num_workers": 2}
    iterator = iter(vmoe_data.train_pipeline("digits", **options))
    for _ in range(4):
        next(iterator)
    state = iterator.get_state()
    expected = [b["id"] for b in itertools.islice(iterator, 3)]
    iterator.close()
    restored = iter(vmoe_data.train_pipeline("digits", **options))
    restored.set_state(json.loads(json.dumps(state)))
    got = [b["id"] for b in itertools.islice(restored, 3)]
    restored.close()
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
