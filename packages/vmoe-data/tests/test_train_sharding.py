"""Train batches across processes: every process gets the same number of batches, all of the
same shapes, for any dataset size N, global batch B and process count P (else multi-host jax
hangs on the step that only some processes run)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vmoe_data
from vmoe_data import ArraySource, Dataset

pytestmark = pytest.mark.usefixtures("both_paths")


def _numbered(n: int) -> Dataset:
    arrays = {"id": np.arange(n), "label": np.zeros(n, np.int64)}
    return Dataset("numbered", 1, {"train": n}, lambda split: ArraySource(arrays))


def read_all(n, batch_size, process_count, num_epochs=1, drop_remainder=True):
    """{process: [batches]} of one full run on every process."""
    dataset = _numbered(n)
    return {
        p: list(
            vmoe_data.train_pipeline(
                dataset,
                batch_size=batch_size,
                num_epochs=num_epochs,
                drop_remainder=drop_remainder,
                seed=7,
                num_threads=0,
                process_index=p,
                process_count=process_count,
            )
        )
        for p in range(process_count)
    }


def check_processes_agree(runs, local_batch):
    """Same number of batches everywhere, every batch with the same features and shapes."""
    shapes = {
        p: [{k: v.shape for k, v in batch.items()} for batch in batches]
        for p, batches in runs.items()
    }
    assert len({len(s) for s in shapes.values()}) == 1, {p: len(s) for p, s in shapes.items()}
    first = shapes[0]
    assert all(s == first for s in shapes.values())
    assert all(shape["id"] == (local_batch,) for shape in first)


def real_ids(runs):
    ids = []
    for batches in runs.values():
        for batch in batches:
            ids += batch["id"][batch["mask"]].tolist() if "mask" in batch else batch["id"].tolist()
    return ids


@pytest.mark.parametrize(
    ("n", "batch_size", "process_count"),
    [(1253, 66, 2), (130, 64, 4), (100, 8, 4), (131, 64, 2)],
)
def test_drop_remainder_gives_every_process_the_same_whole_batches(n, batch_size, process_count):
    runs = read_all(n, batch_size, process_count)
    check_processes_agree(runs, batch_size // process_count)
    assert len(runs[0]) == n // batch_size
    ids = real_ids(runs)
    assert len(ids) == len(set(ids)) == n // batch_size * batch_size


@pytest.mark.parametrize(
    ("n", "batch_size", "process_count"),
    [(63, 64, 2), (130, 64, 4), (1253, 66, 2), (5, 2, 2)],
)
def test_without_drop_remainder_every_process_gets_padded_masked_batches(
    n, batch_size, process_count
):
    runs = read_all(n, batch_size, process_count, drop_remainder=False)
    check_processes_agree(runs, batch_size // process_count)
    assert len(runs[0]) == -(-n // batch_size)  # ceil(N / B)
    assert sorted(real_ids(runs)) == list(range(n))


def test_a_split_smaller_than_one_batch_with_drop_remainder_is_an_error():
    with pytest.raises(ValueError, match=r"63 examples x num_epochs=1, fewer than batch_size=64"):
        read_all(63, 64, 2)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 150),
    local_batch=st.integers(1, 40),
    process_count=st.integers(1, 4),
    num_epochs=st.integers(1, 3),
    drop_remainder=st.booleans(),
)
def test_any_n_b_p_gives_equal_batches_and_each_example_its_epochs(
    n, local_batch, process_count, num_epochs, drop_remainder
):
    batch_size = local_batch * process_count
    total = n * num_epochs
    if drop_remainder and total < batch_size:
        with pytest.raises(ValueError, match="fewer than batch_size"):
            read_all(n, batch_size, process_count, num_epochs, drop_remainder)
        return
    runs = read_all(n, batch_size, process_count, num_epochs, drop_remainder)
    check_processes_agree(runs, local_batch)
    counts = collections.Counter(real_ids(runs))
    if drop_remainder:
        assert len(runs[0]) == total // batch_size
        assert sum(counts.values()) == total // batch_size * batch_size
        assert max(counts.values()) <= num_epochs
    else:
        assert len(runs[0]) == -(-total // batch_size)
        assert counts == {i: num_epochs for i in range(n)}
