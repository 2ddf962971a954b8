"""The eval pipeline: ordered, the last batch padded and masked, every example counted once."""

from __future__ import annotations

import numpy as np
import pytest

import vmoe_data

pytestmark = pytest.mark.usefixtures("both_paths")


def evaluate(split="test", **kwargs):
    options = {"batch_size": 100, "pp": "value_range(0, 1)", "process_index": 0, "process_count": 1}
    return list(vmoe_data.eval_pipeline("digits", split=split, **{**options, **kwargs}))


def source_ids(digits, split="test"):
    source = digits.source(split)
    return [int(source[i]["id"]) for i in range(len(source))]


def test_batches_are_ceil_n_over_b_with_a_padded_last_batch():
    batches = evaluate()  # 364 examples
    assert [len(b["mask"]) for b in batches] == [100, 100, 100, 100]
    assert [int(b["mask"].sum()) for b in batches] == [100, 100, 100, 64]
    assert batches[-1]["mask"].tolist() == [True] * 64 + [False] * 36


def test_masked_examples_are_every_example_once_in_order(digits):
    batches = evaluate()
    seen = [int(i) for b in batches for i, m in zip(b["id"], b["mask"], strict=True) if m]
    assert seen == source_ids(digits)


def test_masked_label_counts_equal_the_split_label_counts(digits):
    counts = sum(np.bincount(b["label"][b["mask"]], minlength=10) for b in evaluate())
    np.testing.assert_array_equal(counts, np.bincount(digits.labels("test"), minlength=10))


def test_no_padding_when_the_batch_size_divides_the_split():
    batches = evaluate(split="validation", batch_size=60)  # 180 examples
    assert len(batches) == 3
    assert all(b["mask"].all() for b in batches)


def test_processes_split_each_global_batch_in_process_order():
    single = evaluate(batch_size=120)
    shards = [evaluate(batch_size=120, process_index=p, process_count=3) for p in range(3)]
    assert [len(s) for s in shards] == [len(single)] * 3  # same number of batches everywhere
    for b, global_batch in enumerate(single):
        for key in ("id", "mask", "image"):
            joined = np.concatenate([shards[p][b][key] for p in range(3)])
            np.testing.assert_array_equal(joined, global_batch[key])


def test_padding_keeps_pp_output_shapes():
    batches = evaluate(batch_size=300, pp="decode|resize(4)|onehot(10)")
    assert [b["image"].shape for b in batches] == [(300, 4, 4, 1)] * 2
    assert batches[-1]["labels"].shape == (300, 10)


def test_mask_is_added_after_keep():
    (batch, *_) = evaluate(pp="keep('image')")
    assert set(batch) == {"image", "mask"}


def test_eval_batch_size_not_divisible_by_process_count_is_an_error():
    with pytest.raises(ValueError, match=r"batch_size=10 is not divisible by process_count=3"):
        evaluate(batch_size=10, process_count=3)


@pytest.mark.parametrize("pipeline", ["eval", "few_shot"])
def test_batch_ops_are_an_error_because_they_would_mix_in_padding(pipeline):
    spec = "value_range|onehot(10)|mixup"
    with pytest.raises(ValueError, match=r"has batch ops \['mixup'\]; eval and few-shot"):
        if pipeline == "eval":
            evaluate(pp=spec)
        else:
            vmoe_data.few_shot_pipeline("digits", shots=1, batch_size=10, pp=spec)


def test_random_ops_do_not_depend_on_the_process_count():
    """Example i gets the same augmentation whichever process, and whichever row, reads it."""
    spec = "decode|random_crop(5)|flip_lr"
    single = evaluate(batch_size=120, pp=spec, seed=4)
    shards = [
        evaluate(batch_size=120, pp=spec, seed=4, process_index=p, process_count=4)
        for p in range(4)
    ]
    for b, global_batch in enumerate(single):
        joined = np.concatenate([shards[p][b]["image"] for p in range(4)])
        np.testing.assert_array_equal(joined, global_batch["image"])
