"""The vectorised path: Draws, the batch resampler, every op's vectorised form against the
per-example op (or a slow reference fed the same draws), and the in-memory cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

import vmoe_data
from vmoe_data import ArraySource, Dataset, Draws, preprocess
from vmoe_data.cache import in_memory
from vmoe_data.pp_image import _resize
from vmoe_data.resample import METHODS, crop_resize

# ---------------------------------------------------------------- Draws


def test_draws_depend_on_the_example_not_on_its_batch():
    ids = np.array([5, 9, 2, 40], np.int64)
    whole = Draws(7, ids, stream=1).uniform(size=3)
    reordered = Draws(7, ids[[2, 0, 3, 1]], stream=1).uniform(size=3)
    alone = np.concatenate([Draws(7, ids[i : i + 1], stream=1).uniform(size=3) for i in range(4)])
    np.testing.assert_array_equal(whole[[2, 0, 3, 1]], reordered)
    np.testing.assert_array_equal(whole, alone)


def test_draws_differ_across_keys_streams_ids_and_calls():
    ids = np.arange(1000)
    first = Draws(1, ids, 0)
    a, b = first.uniform(), first.uniform()
    others = [
        Draws(2, ids, 0).uniform(),
        Draws(1, ids, 1).uniform(),
        Draws(1, ids + 1, 0).uniform(),
    ]
    for other in [b, *others]:
        assert np.mean(a == other) < 0.01
    assert len(np.unique(a)) == 1000


def test_draws_are_uniform_and_integers_stay_in_their_ranges():
    draws = Draws(3, np.arange(20000), 0)
    u = draws.uniform(2.0, 5.0)
    assert u.min() >= 2.0 and u.max() < 5.0
    assert abs(u.mean() - 3.5) < 0.03 and abs(u.var() - 0.75) < 0.03  # var of U(2, 5) = 9/12
    high = np.arange(20000) % 7 + 1  # a bound per example: 1..7
    values = draws.integers(0, high)
    assert (values >= 0).all() and (values < high).all()
    counts = np.bincount(values[high == 7], minlength=7)
    assert counts.min() > 0.8 * counts.mean()  # every value of [0, 7) drawn about as often


def test_draws_reject_bad_ids_and_empty_ranges():
    with pytest.raises(ValueError, match="1-D int array"):
        Draws(0, np.zeros((2, 2), np.int64), 0)
    with pytest.raises(ValueError, match="low < high"):
        Draws(0, np.arange(3), 0).integers(2, 2)


# ---------------------------------------------------------------- the batch resampler


def _pillow_float(image, method, size):
    """Pillow's float ('F') resize of each channel: the exact reference."""
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F").resize(
                size[::-1], {"bilinear": 2, "area": 4, "bicubic": 3, "lanczos": 1}[method]
            )
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, -1)


@pytest.mark.parametrize("method", METHODS)
def test_crop_resize_equals_pillow_on_random_crops(method):
    rng = np.random.default_rng(0)
    worst_float, worst_uint8 = 0.0, 0
    for _ in range(150):
        h, w = rng.integers(2, 16, 2)
        image = rng.integers(0, 256, (h, w, rng.choice([1, 3]))).astype(np.uint8)
        ch, cw = rng.integers(1, h + 1), rng.integers(1, w + 1)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out = tuple(int(s) for s in rng.integers(1, 20, 2))
        box = [np.array([v]) for v in (top, left, ch, cw)]
        crop = image[top : top + ch, left : left + cw]
        got = crop_resize(image[None].astype(np.float32), *box, out, method)[0]
        worst_float = max(
            worst_float, np.abs(got - _pillow_float(crop.astype(np.float32), method, out)).max()
        )
        if method in ("bilinear", "area"):  # Pillow rounds between passes: within 1
            got8 = crop_resize(image[None], *box, out, method)[0].astype(int)
            worst_uint8 = max(worst_uint8, np.abs(got8 - _resize(crop, *out, method)).max())
    assert worst_float < 1e-3
    assert worst_uint8 <= 1


@pytest.mark.parametrize("method", METHODS)
def test_one_axis_uint8_resize_is_pillows_up_to_rounding(method):
    # no intermediate 8-bit pass on one axis: only fixed point vs float32 at .5 can differ
    rng = np.random.default_rng(1)
    equal = total = 0
    for _ in range(100):
        n, out = int(rng.integers(1, 20)), int(rng.integers(1, 30))
        image = rng.integers(0, 256, (3, n, 1)).astype(np.uint8)
        zero = np.array([0])
        got = crop_resize(image[None], zero, zero, np.array([3]), np.array([n]), (3, out), method)
        diff = np.abs(got[0].astype(int) - _resize(image, 3, out, method))
        assert diff.max() <= 1
        equal, total = equal + np.sum(diff == 0), total + diff.size
    assert equal / total > 0.99


def test_crop_resize_is_per_example():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    top, left, height, width = (
        np.array(v) for v in ([0, 1, 2, 0], [3, 0, 1, 0], [5, 7, 6, 8], [4, 8, 7, 8])
    )
    batch = crop_resize(images, top, left, height, width, (6, 5), "bilinear")
    for i in range(4):
        alone = crop_resize(
            images[i : i + 1],
            top[i : i + 1],
            left[i : i + 1],
            height[i : i + 1],
            width[i : i + 1],
            (6, 5),
            "bilinear",
        )
        np.testing.assert_array_equal(batch[i], alone[0])


# ---------------------------------------------------------------- ops: vectorised vs per example


def _batch(rng, count=6, size=(9, 7), channels=3):
    return {
        "image": rng.integers(0, 256, (count, *size, channels)).astype(np.uint8),
        "label": rng.integers(0, 10, count),
        "id": np.arange(count),
    }


def _per_example(spec, batch):
    pp = preprocess(spec)
    rows = [
        pp({k: v[i] for k, v in batch.items()}, np.random.default_rng(0))
        for i in range(len(batch["id"]))
    ]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


@pytest.mark.parametrize(
    "spec, tolerance",
    [
        ("decode", 0),
        ("decode(channels=1)", 0),
        ("resize((5, 11))", 1),
        ("resize(4, method='area')", 1),
        ("resize_small(4, method='bilinear')", 1),
        ("central_crop((5, 3))", 0),
        ("value_range(-1, 1)", 0),
        ("normalize", 1e-6),
        ("onehot(10)|keep('image', 'labels')", 0),
        (
            "decode|resize(12)|central_crop(10)|value_range(0, 1)|onehot(10, on=0.9, off=0.01)",
            1 / 255,
        ),
    ],
)
def test_deterministic_ops_vectorised_equal_per_example(spec, tolerance):
    rng = np.random.default_rng(3)
    batch = _batch(rng)
    pp = preprocess(spec)
    assert pp.vectorizable
    got = pp.apply_vectorized(dict(batch), key=0, ids=batch["id"])
    want = _per_example(spec, batch)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
        np.testing.assert_allclose(got[key].astype(float), want[key].astype(float), atol=tolerance)


def test_decode_vectorised_takes_stacked_2d_images_and_grey_to_rgb():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = preprocess("decode(channels=3)").apply_vectorized({"image": images}, 0, np.arange(2))
    np.testing.assert_array_equal(got["image"], np.repeat(images[..., None], 3, axis=-1))


def test_onehot_vectorised_multi_hot_and_errors():
    pp = preprocess("onehot(4)")
    got = pp.apply_vectorized({"label": np.array([[0, 3], [2, 2]])}, 0, np.arange(2))
    np.testing.assert_array_equal(got["labels"], [[1, 0, 0, 1], [0, 0, 1, 0]])
    with pytest.raises(ValueError, match=r"label \[7\] outside"):
        pp.apply_vectorized({"label": np.array([1, 7])}, 0, np.arange(2))


def test_random_crop_vectorised_equals_a_loop_over_the_same_draws():
    rng = np.random.default_rng(4)
    batch = _batch(rng, count=50)
    got = preprocess("random_crop((4, 5))").apply_vectorized(dict(batch), 11, batch["id"])
    draws = Draws(11, batch["id"], 0)
    tops, lefts = draws.integers(0, 9 - 4 + 1), draws.integers(0, 7 - 5 + 1)
    for i in range(50):
        want = batch["image"][i, tops[i] : tops[i] + 4, lefts[i] : lefts[i] + 5]
        np.testing.assert_array_equal(got["image"][i], want)
    assert len({(t, l) for t, l in zip(tops, lefts, strict=True)}) > 10  # positions vary


def test_inception_crop_vectorised_equals_a_loop_over_the_same_draws():
    rng = np.random.default_rng(5)
    count, (h, w) = 300, (9, 7)
    batch = _batch(rng, count=count, size=(h, w))
    spec = "inception_crop((6, 6), area_min=30, area_max=100)"
    got = preprocess(spec).apply_vectorized(dict(batch), 12, batch["id"])
    draws = Draws(12, batch["id"], 0)
    areas = h * w * draws.uniform(30, 100, size=10) / 100
    ratios = np.exp(draws.uniform(math.log(3 / 4), math.log(4 / 3), size=10))
    crop_heights, crop_widths, fallbacks = [], [], 0
    for i in range(count):  # the per-example op's loop, fed the same numbers
        for area, ratio in zip(areas[i], ratios[i], strict=True):
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            ch = cw = min(h, w)
            fallbacks += 1
        crop_heights.append(ch)
        crop_widths.append(cw)
    crop_heights, crop_widths = np.array(crop_heights), np.array(crop_widths)
    tops, lefts = draws.integers(0, h - crop_heights + 1), draws.integers(0, w - crop_widths + 1)
    assert fallbacks == 0  # area >= 30%: a try always fits here
    for i in range(count):
        crop = batch["image"][
            i, tops[i] : tops[i] + crop_heights[i], lefts[i] : lefts[i] + crop_widths[i]
        ]
        diff = np.abs(got["image"][i].astype(int) - _resize(crop, 6, 6, "bilinear").astype(int))
        assert diff.max() <= 1, i
    covered = crop_heights * crop_widths / (h * w)
    assert covered.min() >= 0.2 and covered.max() <= 1.0 and covered.std() > 0.1


def test_inception_crop_falls_back_to_the_central_square():
    # a 1-pixel-high image: no window of aspect ratio in [3/4, 4/3] covering >= 90% fits
    images = np.arange(2 * 1 * 9 * 1, dtype=np.uint8).reshape(2, 1, 9, 1)
    got = preprocess("inception_crop(1, area_min=90)").apply_vectorized(
        {"image": images}, 0, np.arange(2)
    )
    np.testing.assert_array_equal(got["image"][:, 0, 0, 0], images[:, 0, 4, 0])  # the centre pixel


def test_flip_lr_vectorised_flips_about_the_probability():
    rng = np.random.default_rng(6)
    batch = _batch(rng, count=2000)
    got = preprocess("flip_lr(0.3)").apply_vectorized(dict(batch), 0, batch["id"])["image"]
    flipped = np.all(got == batch["image"][:, :, ::-1], axis=(1, 2, 3))
    kept = np.all(got == batch["image"], axis=(1, 2, 3))
    assert np.all(flipped | kept)
    assert abs(flipped.mean() - 0.3) < 0.04


def test_ops_without_a_vectorised_form_keep_the_per_example_path():
    assert not preprocess("resize(4, method='nearest')").vectorizable
    assert not preprocess("inception_crop").vectorizable  # no size: crops of many sizes
    assert not preprocess([lambda example, rng: example]).vectorizable
    assert preprocess(
        "decode|inception_crop(8)|flip_lr|value_range|onehot(10)|keep('image')"
    ).vectorizable


# ---------------------------------------------------------------- pipelines and the cache


class _CountingSource:
    """A plain source that counts the examples read."""

    def __init__(self, n, image_shape=(4, 4, 1)):
        self.n = n
        self.reads = 0
        self.image_shape = image_shape

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        self.reads += 1
        image = np.full(self.image_shape, index % 256, np.uint8)
        return {"image": image, "label": np.int64(index % 3), "id": np.int64(index)}


def _dataset(source):
    return Dataset("counting", 3, {"train": len(source)}, lambda split: source)


def test_a_split_is_read_once_for_every_pipeline_over_it():
    source = _CountingSource(100)
    reads = []
    for _ in range(3):
        batches = list(
            vmoe_data.eval_pipeline(
                _dataset(source),
                split="train",
                batch_size=32,
                pp="keep('id')",
                process_index=0,
                process_count=1,
            )
        )
        assert np.concatenate([b["id"][b["mask"]] for b in batches]).tolist() == list(range(100))
        reads.append(source.reads)
    # the first pipeline reads the split once (and example 0 twice: checking the spec, probing
    # the size); later ones only example 0, to check the spec
    assert reads == [102, 103, 104]


def test_the_pipeline_takes_the_vectorised_form_for_in_memory_splits():
    calls = []

    def tag(example, rng):
        return {**example, "tag": np.int64(-1)}

    def tag_batch(batch, draws):
        calls.append(len(batch["id"]))
        return {**batch, "tag": np.full(len(batch["id"]), -1, np.int64)}

    spec = [vmoe_data.with_vectorized(tag, tag_batch), "keep('id', 'tag')"]
    options = dict(batch_size=8, pp=spec, num_epochs=1, process_index=0, process_count=1)
    vectorised = list(vmoe_data.train_pipeline(_dataset(_CountingSource(40)), **options))
    assert calls == [8] * 5
    per_example = list(
        vmoe_data.train_pipeline(_dataset(_CountingSource(40)), cache=False, **options)
    )
    assert len(calls) == 5  # not called again: cache=False reads per example
    for a, b in zip(vectorised, per_example, strict=True):
        np.testing.assert_array_equal(a["tag"], b["tag"])
        assert sorted(a) == sorted(b) == ["id", "tag"]


def test_both_paths_give_the_same_batches_for_deterministic_specs(digits):
    spec = "decode|resize(12, method='area')|value_range(-1, 1)|onehot(10)"
    for pipeline in (vmoe_data.eval_pipeline, vmoe_data.train_pipeline):
        extra = (
            {}
            if pipeline is vmoe_data.eval_pipeline
            else {"shuffle": False, "num_epochs": 1, "drop_remainder": False}
        )
        fast, slow = (
            list(
                pipeline(
                    "digits",
                    batch_size=100,
                    pp=spec,
                    cache=cache,
                    process_index=0,
                    process_count=1,
                    **extra,
                )
            )
            for cache in (None, False)
        )
        assert len(fast) == len(slow)
        for a, b in zip(fast, slow, strict=True):
            assert a.keys() == b.keys()
            np.testing.assert_array_equal(a["mask"], b["mask"])
            np.testing.assert_allclose(a["image"], b["image"], atol=2 / 255)
            np.testing.assert_array_equal(a["labels"], b["labels"])


def test_cache_true_refuses_examples_that_do_not_stack():
    numeric = ArraySource({"image": np.zeros((2, 3, 3, 1), np.uint8), "label": np.zeros(2)})
    assert in_memory(numeric, None).arrays is numeric.arrays  # in memory already: as it is
    encoded = ArraySource(
        {"image": np.array([b"\x89PNG", b"GIF8"], dtype=object), "label": np.zeros(2)}
    )
    assert in_memory(encoded, None) is None
    with pytest.raises(ValueError, match="do not stack"):
        in_memory(encoded, True)

    class Ragged(_CountingSource):
        def __getitem__(self, index):
            return {"image": np.zeros((index + 1, 2, 1), np.uint8), "label": np.int64(0)}

    assert in_memory(Ragged(4), None) is None
    with pytest.raises(ValueError, match="do not stack"):
        in_memory(Ragged(4), True)


def test_auto_cache_leaves_large_splits_on_disk(monkeypatch):
    monkeypatch.setattr(vmoe_data.cache, "AUTO_CACHE_BYTES", 100)
    assert in_memory(_CountingSource(100), None) is None  # 100 x 32 bytes > 100
    assert in_memory(_CountingSource(100), True) is not None
    assert in_memory(_CountingSource(100), False) is None
