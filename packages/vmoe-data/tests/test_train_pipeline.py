"""The train pipeline: seeded shuffle, repeat, per-process sharding, batching, workers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import vmoe_data
from vmoe_data import ArraySource, Dataset

pytestmark = pytest.mark.usefixtures("both_paths")

PP = "decode|random_crop(6)|flip_lr|value_range(-1, 1)|onehot(10)"


def train(**kwargs):
    options = {"batch_size": 32, "pp": PP, "process_index": 0, "process_count": 1}
    return vmoe_data.train_pipeline("digits", **{**options, **kwargs})


def take(pipeline, n):
    return list(itertools.islice(iter(pipeline), n))


def ids(batches):
    return np.concatenate([b["id"] for b in batches]).tolist()


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_batches_have_the_local_batch_size_and_pp_shapes():
    (batch,) = take(train(), 1)
    assert batch["image"].shape == (32, 6, 6, 1)
    assert batch["image"].dtype == np.float32
    assert batch["labels"].shape == (32, 10)
    assert batch["label"].shape == (32,)


def test_same_seed_gives_identical_batches():
    assert_same_batches(take(train(seed=3), 5), take(train(seed=3), 5))


def test_different_seeds_give_different_orders():
    assert ids(take(train(seed=1), 1)) != ids(take(train(seed=2), 1))


def test_one_epoch_sees_every_example_once(digits):
    batches = list(train(num_epochs=1, drop_remainder=False, batch_size=100))
    real = np.concatenate([b["id"][b["mask"]] for b in batches]).tolist()
    assert sorted(real) == sorted(int(digits.source("train")[i]["id"]) for i in range(1253))


def test_without_drop_remainder_the_last_batch_is_padded_and_masked():
    batches = list(train(num_epochs=1, drop_remainder=False, batch_size=100))
    assert [len(b["id"]) for b in batches] == [100] * 13
    assert [int(b["mask"].sum()) for b in batches] == [100] * 12 + [53]
    assert batches[-1]["mask"].tolist() == [True] * 53 + [False] * 47


def test_each_epoch_is_a_new_permutation():
    first, second = (b["id"].tolist() for b in train(num_epochs=2, batch_size=1253, pp=None))
    assert sorted(first) == sorted(second)
    assert first != second


def test_drop_remainder_drops_the_last_partial_batch():
    batches = list(train(num_epochs=1, batch_size=100))
    assert [len(b["id"]) for b in batches] == [100] * 12


def test_without_shuffle_the_split_order_is_kept(digits):
    batches = take(train(shuffle=False, batch_size=10, pp=None), 2)
    expected = [int(digits.source("train")[i]["id"]) for i in range(20)]
    assert ids(batches) == expected


def test_repeats_forever_by_default():
    batches = take(train(batch_size=500, pp=None), 6)  # 3000 > 2 epochs of 1253
    assert len(batches) == 6


def test_processes_stride_the_same_global_stream():
    global_ids = ids(list(train(num_epochs=1, batch_size=90, pp=None)))
    per_process = [
        ids(list(train(num_epochs=1, batch_size=90, pp=None, process_index=p, process_count=3)))
        for p in range(3)
    ]
    for p in range(3):
        assert per_process[p] == global_ids[p::3]


def test_random_ops_do_not_depend_on_the_process_count():
    """An example gets the same augmentation whichever process reads it."""
    spec = "decode|randaug(2, 10)|random_crop(5)|flip_lr"
    one = take(train(batch_size=4, pp=spec), 1)[0]
    two = take(train(batch_size=4, pp=spec, process_count=2), 1)[0]
    np.testing.assert_array_equal(one["image"][0::2], two["image"])


def test_batch_ops_run_after_batching():
    (batch,) = take(train(pp=PP + "|mixup(1.0)"), 1)
    assert batch["labels"].shape == (32, 10)
    np.testing.assert_allclose(batch["labels"].sum(axis=1), 1, rtol=1e-5)
    assert (batch["labels"].max(axis=1) < 1).any()  # soft labels


def test_mixup_of_a_batch_is_the_same_after_resuming():
    spec = PP + "|mixup(0.5, groups=8, largest_first=True)"
    expected = take(train(seed=2, pp=spec), 3)[2]
    iterator = iter(train(seed=2, pp=spec))
    iterator.set_state({"batches": 2})
    resumed = next(iterator)
    assert resumed.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key])
    assert (expected["labels"].max(axis=1) < 1).any()  # mixed


def test_worker_processes_give_the_same_batches():
    spec = PP.replace("decode|", "decode|randaug(2, 10)|") + "|mixup(0.5, groups=4)"
    expected = take(train(seed=5, pp=spec), 4)
    pipeline = train(seed=5, pp=spec, num_workers=2)
    iterator = iter(pipeline)
    batches = [next(iterator) for _ in range(4)]
    iterator.close()
    assert_same_batches(batches, expected)


def test_batch_size_not_divisible_by_process_count_is_an_error():
    with pytest.raises(ValueError, match=r"batch_size=30 is not divisible by process_count=4"):
        train(batch_size=30, process_count=4)


def test_process_index_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"process_index=2 must be an integer in \[0, 1\]"):
        train(process_index=2, process_count=2)


def test_numpy_ints_are_accepted_for_process_index_and_count():
    assert vmoe_data.resolve_processes(np.int64(1), np.int64(2)) == (1, 2)


@pytest.mark.parametrize("value", ["no", 0, None])
def test_shuffle_and_drop_remainder_must_be_bools(value):
    with pytest.raises(ValueError, match=rf"shuffle={value!r} must be True or False"):
        train(shuffle=value)
    with pytest.raises(ValueError, match=rf"drop_remainder={value!r} must be True or False"):
        train(drop_remainder=value)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"batch_size": 0}, r"batch_size=0 must be an integer >= 1"),
        ({"seed": -1}, r"seed=-1 must be an integer in \[0, 4294967295\]"),
        ({"num_epochs": 0}, r"num_epochs=0 must be an integer >= 1"),
        ({"num_workers": -1}, r"num_workers=-1 must be an integer >= 0"),
        ({"batch_size": 2.0}, r"batch_size=2.0 must be an integer"),
    ],
)
def test_bad_arguments_are_errors(option, message):
    with pytest.raises(ValueError, match=message):
        train(**option)


def test_process_index_and_count_default_to_jax():
    assert vmoe_data.resolve_processes(None, None) == (0, 1)


def _dataset_of(images) -> Dataset:
    arrays = {"image": images, "label": np.zeros(len(images), np.int64)}
    return Dataset("bad", 1, {"train": len(images)}, lambda split: ArraySource(arrays))


def test_images_of_the_wrong_rank_fail_when_the_pipeline_is_built():
    dataset = _dataset_of(np.zeros((4, 2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match=r"decode: 'image' has rank 4 \(shape \(2, 8, 8, 1\)\)"):
        vmoe_data.train_pipeline(
            dataset, batch_size=2, pp="decode", process_count=1, process_index=0
        )


def test_images_of_the_wrong_dtype_fail_when_the_pipeline_is_built():
    dataset = _dataset_of(np.zeros((4, 8, 8, 1), np.float64))
    with pytest.raises(ValueError, match=r"decode: 'image' has dtype float64"):
        vmoe_data.train_pipeline(
            dataset, batch_size=2, pp="decode", process_count=1, process_index=0
        )


def test_unknown_dataset_name_in_a_pipeline():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        vmoe_data.train_pipeline("mnist", batch_size=2)


class _ShapeChangingSource:
    """8 examples; from index 5 on the images have rank 4 (or another size)."""

    def __init__(self, late_shape):
        self.late_shape = late_shape

    def __len__(self):
        return 8

    def __getitem__(self, i):
        shape = self.late_shape if i >= 5 else (4, 4, 1)
        return {"image": np.zeros(shape, np.uint8), "label": np.int64(0)}


def _iterate(late_shape, pp):
    dataset = Dataset("changing", 1, {"train": 8}, lambda split: _ShapeChangingSource(late_shape))
    pipeline = vmoe_data.train_pipeline(
        dataset, batch_size=2, pp=pp, shuffle=False, process_index=0, process_count=1
    )
    return take(pipeline, 4)


def test_bad_image_met_during_iteration_raises_the_op_error():
    with pytest.raises(ValueError, match=r"resize: 'image' has rank 4 \(shape \(1, 4, 4, 1\)\)"):
        _iterate((1, 4, 4, 1), pp="resize(2)")


def test_images_of_different_sizes_in_a_batch_name_the_feature():
    with pytest.raises(
        ValueError,
        match=r"differ in the shape of 'image': \[\(4, 4, 1\), \(5, 5, 1\)\]; add a resize",
    ):
        _iterate((5, 5, 1), pp="decode")


def _draws(seed, process_index, process_count, pipeline="train"):
    """What the rng of the first batch op call drew, for one process."""

    @vmoe_data.batch_op
    def record(batch, rng):
        return {**batch, "draw": np.full(len(batch["id"]), rng.uniform())}

    spec = ["keep('id', 'label')", record]
    batch = take(
        train(seed=seed, pp=spec, process_index=process_index, process_count=process_count), 1
    )[0]
    return float(batch["draw"][0])


def test_batch_op_random_streams_differ_across_seeds_and_processes():
    draws = {(s, p): _draws(s, p, 4) for s in range(3) for p in range(4)}
    assert len(set(draws.values())) == len(draws)


def test_seed_streams_never_collide():
    from vmoe_data.pipelines import _seed

    keys = [(s, stream, p) for s in range(50) for stream in range(4) for p in range(8)]
    assert len({_seed(*key) for key in keys}) == len(keys)


def test_mixed_grayscale_and_colour_images_name_decode_channels():
    with pytest.raises(
        ValueError, match=r"differ in the shape of 'image': .*decode\(channels=1\) or decode"
    ):
        _iterate((4, 4, 3), pp="decode")


def test_pp_output_image_must_be_an_image_even_without_image_ops():
    dataset = _dataset_of(np.zeros((4, 2, 8, 8, 1), np.float64))
    with pytest.raises(ValueError, match=r"pp spec 'onehot\(1\)' leaves 'image' as dtype float64"):
        vmoe_data.train_pipeline(
            dataset, batch_size=2, pp="onehot(1)", process_count=1, process_index=0
        )
