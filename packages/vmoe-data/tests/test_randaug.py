"""randaug: each op on small known images (hand-computed), the magnitude map, the draws, the
vectorised form against the per-example op fed the same numbers, pipelines, and errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import vmoe_data
from vmoe_data import Draws, preprocess
from vmoe_data import randaug as ra

FILL = 128


def batch_of(*images):
    """uint8 [M, H, W, C] from lists of rows ([H, W] images get one channel)."""
    stacked = np.asarray(images, dtype=np.uint8)
    return stacked[..., None] if stacked.ndim == 3 else stacked


def random_images(count=5, size=(6, 5), channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, *size, channels)).astype(np.uint8)


def op_at(name, magnitude):
    """The layer op `name` at `magnitude`: op(images, sign, row, col)."""
    return ra.layer_ops(float(magnitude))[ra.OPS.index(name)]


def run_op(name, magnitude, images, sign=1.0, row=0, col=0):
    count = len(images)
    return op_at(name, magnitude)(
        images,
        np.full(count, sign, np.float32),
        np.full(count, row, np.int64),
        np.full(count, col, np.int64),
    )


# ---------------------------------------------------------------- each op on a known image


def test_invert():
    x = batch_of([[0, 1, 255]])
    np.testing.assert_array_equal(ra.invert(x), batch_of([[255, 254, 0]]))


def test_autocontrast_stretches_each_channel_and_keeps_flat_ones():
    x = np.zeros((1, 1, 3, 3), np.uint8)
    x[0, 0, :, 0] = [0, 17, 85]  # span 85: scale 3
    x[0, 0, :, 1] = [10, 11, 27]  # span 17: scale 15
    x[0, 0, :, 2] = [9, 9, 9]  # one value: unchanged
    out = ra.autocontrast(x)[0, 0]
    np.testing.assert_array_equal(out.T, [[0, 51, 255], [0, 15, 255], [9, 9, 9]])


def test_equalize_follows_pillows_lookup_table():
    # 300 x 10, 210 x 20, 2 x 30: step = (512 - 2) // 255 = 2 and value v maps to
    # (cumulative count below v + 1) // 2: 10 -> 0, 20 -> (300 + 1) // 2, 30 -> (510 + 1) // 2
    pixels = np.array([10] * 300 + [20] * 210 + [30] * 2, np.uint8)
    x = np.stack([pixels, np.full(512, 7, np.uint8)], axis=-1)[None, None]  # [1, 1, 512, 2]
    out = ra.equalize(x)[0, 0]
    assert {int(v): int(o) for v, o in zip(pixels, out[:, 0], strict=True)} == {
        10: 0,
        20: 150,
        30: 255,
    }
    np.testing.assert_array_equal(out[:, 1], 7)  # one value: step 0, unchanged


def test_equalize_leaves_small_images_unchanged():
    x = random_images(2, (4, 4))  # fewer than 256 pixels besides the last bin: step 0
    np.testing.assert_array_equal(ra.equalize(x), x)


@pytest.mark.parametrize(("bits", "mask"), [(2, 0b11000000), (4, 0b11110000), (8, 0xFF)])
def test_posterize_keeps_the_top_bits(bits, mask):
    x = random_images()
    np.testing.assert_array_equal(ra.posterize(x, bits), x & mask)


@pytest.mark.parametrize("bits", [0, 9, 12])
def test_posterize_outside_1_to_8_bits_keeps_the_top_bit(bits):
    x = random_images()  # TF takes the shift 8 - bits as a uint8 and clamps it to 7
    np.testing.assert_array_equal(ra.posterize(x, bits), x & 0b10000000)


@pytest.mark.parametrize(("threshold", "effective"), [(100, 100), (256, 0), (384, 128), (0, 0)])
def test_solarize_inverts_from_the_threshold_modulo_256(threshold, effective):
    x = batch_of([[0, 99, 100, 127, 128, 255]])
    want = np.where(x < effective, x, 255 - x)
    np.testing.assert_array_equal(ra.solarize(x, threshold), want)


def test_solarize_add_adds_below_128_and_clips():
    x = batch_of([[0, 100, 127, 128, 200]])
    np.testing.assert_array_equal(ra.solarize_add(x, 30), batch_of([[30, 130, 157, 128, 200]]))
    np.testing.assert_array_equal(ra.solarize_add(x, 200)[0, 0, :3, 0], [200, 255, 255])


def test_blend_truncates_interpolation_and_clips_extrapolation():
    x = batch_of([[0, 3, 100, 200, 255]])
    np.testing.assert_array_equal(ra.brightness(x, 0.5), batch_of([[0, 1, 50, 100, 127]]))
    np.testing.assert_array_equal(ra.brightness(x, 1.9), batch_of([[0, 5, 190, 255, 255]]))
    np.testing.assert_array_equal(ra.brightness(x, 1.0), x)
    np.testing.assert_array_equal(ra.brightness(x, 0.0), 0)


def test_color_blends_with_tfs_grey():
    x = batch_of([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]])  # [1, 1, 4, 3]
    # grey = trunc((r * 0.2989 + g * 0.5870 + b * 0.1140) / 255 * 255.5)
    grey = ra.color(x, 0.0)[0, 0]
    np.testing.assert_array_equal(grey, np.repeat([[76], [149], [29], [255]], 3, axis=1))
    single = random_images(channels=1)
    np.testing.assert_array_equal(ra.color(single, 0.1), single)  # its own grey


def test_contrast_blends_towards_pixels_over_256():
    x = random_images(2, (32, 32))  # 1024 pixels: the constant is 1024 / 256 = 4
    want = (4 + np.float32(0.5) * (x.astype(np.float32) - 4)).astype(np.uint8)
    np.testing.assert_array_equal(ra.contrast(x, 0.5), want)
    small = random_images(2, (8, 8))  # 64 / 256 truncates to 0: the same as brightness
    np.testing.assert_array_equal(ra.contrast(small, 0.3), ra.brightness(small, 0.3))


def test_sharpness_smooths_inside_the_border_and_blends():
    x = batch_of([[10, 10, 10], [10, 20, 10], [10, 10, 10]])
    smooth = ra.sharpness(x, 0.0)  # (8 * 10 + 5 * 20) / 13 = 13.8 -> 13; border kept
    np.testing.assert_array_equal(smooth[0, ..., 0], [[10, 10, 10], [10, 13, 10], [10, 10, 10]])
    sharp = ra.sharpness(x, 2.0)  # 13 + 2 * (20 - 13)
    np.testing.assert_array_equal(sharp[0, ..., 0], [[10, 10, 10], [10, 27, 10], [10, 10, 10]])
    tiny = random_images(2, (2, 5))
    np.testing.assert_array_equal(ra.sharpness(tiny, 1.9), tiny)  # all border


def test_rotate_by_90_degrees_is_rot90():
    x = random_images(2, (5, 5))
    np.testing.assert_array_equal(ra.rotate(x, np.float32([90, 90])), np.rot90(x, 1, (1, 2)))
    np.testing.assert_array_equal(ra.rotate(x, np.float32([-90, 0]))[0], np.rot90(x[0], -1))
    np.testing.assert_array_equal(ra.rotate(x, np.float32([-90, 0]))[1], x[1])


def test_rotate_fills_the_corners():
    x = np.full((1, 7, 7, 1), 9, np.uint8)
    out = ra.rotate(x, np.float32([45]))[0, ..., 0]
    assert out[0, 0] == out[-1, -1] == FILL and out[3, 3] == 9


def test_translate_moves_the_content_and_fills():
    x = batch_of([[1, 2, 3, 4], [5, 6, 7, 8]])
    np.testing.assert_array_equal(
        ra.translate_x(x, np.float32([2]))[0, ..., 0], [[3, 4, FILL, FILL], [7, 8, FILL, FILL]]
    )
    np.testing.assert_array_equal(
        ra.translate_x(x, np.float32([-1]))[0, ..., 0], [[FILL, 1, 2, 3], [FILL, 5, 6, 7]]
    )
    np.testing.assert_array_equal(
        ra.translate_y(x, np.float32([1]))[0, ..., 0], [[5, 6, 7, 8], [FILL] * 4]
    )


def test_shear_rounds_halves_away_from_zero():
    x = batch_of([[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]])
    # row r, column c takes column c + 0.5 r: row 1 reads c + 0.5, rounded up
    np.testing.assert_array_equal(
        ra.shear_x(x, np.float32([0.5]))[0, ..., 0],
        [[0, 1, 2, 3], [11, 12, 13, FILL], [21, 22, 23, FILL]],
    )
    # row r, column c takes row r - 0.5 c: 0.5 rounds to 1, -0.5 to -1 (outside)
    np.testing.assert_array_equal(
        ra.shear_y(x, np.float32([-0.5]))[0, ..., 0],
        [[0, FILL, FILL, FILL], [10, 11, 2, FILL], [20, 21, 12, 13]],
    )


def test_cutout_fills_a_square_clipped_to_the_image():
    x = np.zeros((2, 4, 5, 1), np.uint8)
    out = ra.cutout(x, 1, np.array([1, 0]), np.array([2, 4]))[..., 0]
    want = np.zeros((2, 4, 5), np.uint8)
    want[0, 0:2, 1:3] = FILL  # rows [0, 2), columns [1, 3)
    want[1, 0:1, 3:5] = FILL  # rows [-1, 1), columns [3, 5) inside the image
    np.testing.assert_array_equal(out, want)


# ---------------------------------------------------------------- the magnitude map


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Rotate", lambda x: x),
        ("ShearX", lambda x: x),
        ("ShearY", lambda x: x),
        ("TranslateX", lambda x: x),
        ("TranslateY", lambda x: x),
        ("Cutout", lambda x: x),
        ("SolarizeAdd", lambda x: x),
        ("Solarize", lambda x: 255 - x),  # threshold 0
        ("Posterize", lambda x: x & 0b10000000),  # 0 bits: shift clamped to 7
        ("Brightness", lambda x: (x.astype(np.float32) * np.float32(0.1)).astype(np.uint8)),
        ("Invert", lambda x: 255 - x),
    ],
)
def test_magnitude_0(name, expected):
    x = random_images()
    np.testing.assert_array_equal(run_op(name, 0, x, sign=-1.0, row=2, col=2), expected(x))


def test_magnitude_10_and_beyond_are_not_clipped():
    x = random_images(3, (6, 5))
    np.testing.assert_array_equal(run_op("Solarize", 10, x), 255 - x)  # 256: threshold 0
    np.testing.assert_array_equal(run_op("Posterize", 10, x), ra.posterize(x, 4))
    np.testing.assert_array_equal(run_op("Posterize", 20, x), x)  # 8 bits
    np.testing.assert_array_equal(run_op("SolarizeAdd", 20, x), ra.solarize_add(x, 220))
    np.testing.assert_array_equal(run_op("TranslateX", 0.2, x), ra.translate_x(x, [2] * 3))
    np.testing.assert_array_equal(run_op("TranslateY", 10, x), FILL)  # 100 pixels
    np.testing.assert_array_equal(run_op("Rotate", 30, x[:, :5]), np.rot90(x[:, :5], 1, (1, 2)))
    np.testing.assert_array_equal(
        run_op("Rotate", 30, x[:, :5], sign=-1.0), np.rot90(x[:, :5], -1, (1, 2))
    )
    np.testing.assert_array_equal(run_op("ShearX", 20, x), ra.shear_x(x, [0.6] * 3))
    np.testing.assert_array_equal(
        run_op("Cutout", 2.5, x, row=3, col=2), ra.cutout(x, 10, np.full(3, 3), np.full(3, 2))
    )
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = 20 / 10 * 1.8 + 0.1  # 3.7
        np.testing.assert_array_equal(
            run_op(name, 20, x), getattr(ra, name.lower())(x, factor), err_msg=name
        )


# ---------------------------------------------------------------- draws and layers


def unit_for(op, sign=1, row=0.0, col=0.0):
    """The 4 numbers of one layer that pick `op` (index), the sign and cutout centre."""
    return [(ra.OPS.index(op) + 0.5) / len(ra.OPS), 0.75 if sign > 0 else 0.25, row, col]


def test_the_draws_pick_the_op_sign_and_centre():
    x = np.zeros((1, 8, 10, 1), np.uint8)
    got = ra.augment(x, np.array([unit_for("Cutout", row=0.5, col=0.25)]), ra.layer_ops(0.5))
    np.testing.assert_array_equal(got, ra.cutout(x, 2, np.array([4]), np.array([2])))
    y = random_images(1, (4, 6))
    for sign in (1, -1):
        got = ra.augment(y, np.array([unit_for("TranslateX", sign)]), ra.layer_ops(0.1))
        np.testing.assert_array_equal(got, ra.translate_x(y, [sign]))


def test_layers_apply_in_turn():
    x = random_images(1, (4, 6))
    unit = np.array([unit_for("Invert") + unit_for("Invert")])
    np.testing.assert_array_equal(ra.augment(x, unit, ra.layer_ops(10)), x)
    unit = np.array([unit_for("TranslateX") + unit_for("TranslateX")])
    np.testing.assert_array_equal(ra.augment(x, unit, ra.layer_ops(0.1)), ra.translate_x(x, [2]))


class _Replay:
    """An rng stand-in whose uniform() returns given numbers."""

    def __init__(self, numbers):
        self.numbers = numbers

    def uniform(self, size):
        assert size == self.numbers.shape
        return self.numbers


@pytest.mark.parametrize(("channels", "magnitude"), [(3, 10), (1, 20), (3, 3.5)])
def test_vectorised_equals_per_example_given_the_same_draws(channels, magnitude):
    count, layers = 96, 3
    batch = {"image": random_images(count, (7, 9), channels, seed=1), "id": np.arange(count)}
    pp = preprocess(f"randaug({layers}, {magnitude})")
    got = pp.apply_vectorized(dict(batch), key=5, ids=batch["id"])["image"]
    unit = Draws(5, batch["id"], 0).uniform(size=layers * ra.DRAWS_PER_LAYER)
    ops = np.minimum((unit[:, 0::4] * 16).astype(int), 15)
    assert len(np.unique(ops)) == 16  # every op is exercised
    for i in range(count):
        alone = pp({"image": batch["image"][i]}, _Replay(unit[i : i + 1]))["image"]
        np.testing.assert_array_equal(got[i], alone, err_msg=f"example {i}")
    assert np.mean([np.array_equal(g, x) for g, x in zip(got, batch["image"], strict=True)]) < 0.2


def test_per_example_op_is_seeded_by_its_rng():
    image = random_images(1, (8, 8))[0]
    op = preprocess("randaug(2, 9)").example_ops[0][1]
    outs = [op({"image": image}, np.random.default_rng(s))["image"] for s in range(8)]
    np.testing.assert_array_equal(outs[0], op({"image": image}, np.random.default_rng(0))["image"])
    assert len({o.tobytes() for o in outs}) > 4
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)


def test_zero_layers_change_nothing():
    x = random_images(3)
    first = x[0]
    pp = preprocess("randaug(0)")
    assert pp({"image": first}, np.random.default_rng(0))["image"] is first
    np.testing.assert_array_equal(pp.apply_vectorized({"image": x}, 0, np.arange(3))["image"], x)


# ---------------------------------------------------------------- in pipelines


@pytest.mark.usefixtures("both_paths")
def test_an_example_gets_the_same_augmentation_whatever_the_batch_size_and_processes():
    spec = "decode|randaug(2, 5)|keep('id', 'image')"
    options = dict(pp=spec, seed=3, process_index=0)

    def images(batch_size, process_count=1, batches=1, index=0):
        pipeline = vmoe_data.train_pipeline(
            "digits",
            batch_size=batch_size,
            **{**options, "process_index": index},
            process_count=process_count,
        )
        return np.concatenate([b["image"] for b in itertools.islice(pipeline, batches)])

    eight = images(8)
    np.testing.assert_array_equal(images(4, batches=2), eight)
    np.testing.assert_array_equal(images(8, process_count=2, index=1), eight[1::2])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("randaug(-1)", r"randaug: num_layers=-1 must be an integer >= 0"),
        ("randaug(1.5)", r"randaug: num_layers=1.5 must be an integer"),
        ("randaug(2, -1)", r"randaug: magnitude=-1 must be a finite number >= 0"),
        ("randaug(2, 'high')", r"randaug: magnitude='high' must be a finite number"),
        ("randaug(key=3)", r"randaug: key=3 must be"),
    ],
)
def test_bad_arguments(spec, message):
    with pytest.raises(ValueError, match=message):
        preprocess(spec)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), r"randaug: 'image' has dtype float32; expected one"),
        (np.zeros((4, 4, 4), np.uint8), r"randaug: the image has 4 channels; expected 1 or 3"),
        (np.zeros((4, 4), np.uint8), r"randaug: 'image' has rank 2"),
    ],
)
def test_bad_images(image, message):
    pp = preprocess("randaug")
    with pytest.raises(ValueError, match=message):
        pp({"image": image}, np.random.default_rng(0))
    if image.ndim == 3:
        with pytest.raises(ValueError, match=message.replace("rank 2", "")):
            pp.apply_vectorized({"image": image[None]}, 0, np.arange(1))
