"""The built-in preprocessing ops, each against a slow obvious reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import vmoe_data


def op(text):
    """The single op of a one-op spec."""
    (_, fn), *rest = vmoe_data.preprocess(text).example_ops or vmoe_data.preprocess(text).batch_ops
    assert not rest
    return fn


def rng(seed=0):
    return np.random.default_rng(seed)


def image(h=6, w=8, c=3):
    return np.arange(h * w * c, dtype=np.uint8).reshape(h, w, c)


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# decode


def test_decode_png_bytes_gives_the_pixels():
    pixels = image()
    out = op("decode")({"image": png_bytes(pixels)}, rng())
    np.testing.assert_array_equal(out["image"], pixels)


def test_decode_grayscale_png_gets_a_channel_axis():
    pixels = image(c=1)[..., 0]
    out = op("decode")({"image": png_bytes(pixels)}, rng())
    np.testing.assert_array_equal(out["image"], pixels[..., None])


def test_decode_uint8_array_passes_through_and_rank_2_gets_a_channel():
    pixels = image(c=1)
    np.testing.assert_array_equal(op("decode")({"image": pixels}, rng())["image"], pixels)
    np.testing.assert_array_equal(op("decode")({"image": pixels[..., 0]}, rng())["image"], pixels)


def test_decode_channels_3_repeats_grayscale():
    out = op("decode(channels=3)")({"image": image(c=1)}, rng())["image"]
    np.testing.assert_array_equal(out, np.repeat(image(c=1), 3, axis=-1))


def test_decode_rejects_float_images():
    with pytest.raises(
        ValueError, match=r"decode: 'image' has dtype float32; expected one of \['uint8'\]"
    ):
        op("decode")({"image": np.zeros((4, 4, 1), np.float32)}, rng())


def test_decode_rejects_images_of_rank_4():
    with pytest.raises(ValueError, match=r"decode: 'image' has rank 4 \(shape \(1, 4, 4, 1\)\)"):
        op("decode")({"image": np.zeros((1, 4, 4, 1), np.uint8)}, rng())


def test_decode_rejects_other_types():
    with pytest.raises(ValueError, match="decode: 'image' is a list"):
        op("decode")({"image": [1, 2]}, rng())


def encoded(pil_image, fmt="PNG"):
    buffer = io.BytesIO()
    pil_image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_scales_16_bit_images_to_8_bits():
    pixels = np.array([[0, 255, 256, 100 * 256 + 255, 65535]], np.uint16)
    out = op("decode")({"image": encoded(Image.fromarray(pixels))}, rng())["image"]
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 1, 100, 255]])


@pytest.mark.parametrize(
    ("mode", "channels"), [("LA", 1), ("RGBA", 3), ("P", 3), ("CMYK", 3), ("I;16", 1)]
)
def test_decode_gives_1_or_3_channels_dropping_alpha(mode, channels):
    pil = Image.new(mode, (5, 4))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert op("decode")({"image": encoded(pil, fmt)}, rng())["image"].shape == (4, 5, channels)


def test_decode_keeps_the_colour_channels_of_an_rgba_image():
    rgba = np.concatenate([image(), np.full((6, 8, 1), 7, np.uint8)], axis=-1)
    out = op("decode")({"image": png_bytes(rgba)}, rng())["image"]
    np.testing.assert_array_equal(out, image())


def test_decode_rejects_floating_point_images():
    tiff = encoded(Image.fromarray(np.zeros((2, 2), np.float32)), "TIFF")
    with pytest.raises(ValueError, match=r"decode: the image has floating-point pixels"):
        op("decode")({"image": tiff}, rng())


def test_decode_bad_channels_argument():
    with pytest.raises(ValueError, match=r"decode: channels=2 must be None, 1 or 3"):
        op("decode(2)")
    with pytest.raises(ValueError, match=r"decode: channels=True must be None, 1 or 3"):
        op("decode(True)")


# geometry


def test_image_ops_reject_images_without_channel_axis():
    with pytest.raises(ValueError, match=r"resize: 'image' has rank 2 .*expected rank 3"):
        op("resize(4)")({"image": np.zeros((8, 8), np.uint8)}, rng())


def test_resize_gives_the_size_and_keeps_constant_images_constant():
    out = op("resize((3, 5))")({"image": np.full((6, 8, 3), 7, np.uint8)}, rng())["image"]
    assert out.shape == (3, 5, 3)
    assert out.dtype == np.uint8
    assert np.all(out == 7)


def test_resize_nearest_doubling_repeats_pixels():
    pixels = image(2, 3, 1)
    out = op("resize((4, 6), method='nearest')")({"image": pixels}, rng())["image"]
    np.testing.assert_array_equal(out, pixels.repeat(2, axis=0).repeat(2, axis=1))


def test_resize_float_images_with_many_channels():
    pixels = np.random.default_rng(0).random((4, 4, 5)).astype(np.float32)
    out = op("resize(2, method='area')")({"image": pixels}, rng())["image"]
    expected = pixels.reshape(2, 2, 2, 2, 5).mean(axis=(1, 3))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert out.dtype == np.float32


def test_resize_unknown_method():
    with pytest.raises(ValueError, match=r"resize: method='cubic' is not one of"):
        op("resize(2, method='cubic')")


def test_resize_small_scales_the_shorter_side():
    out = op("resize_small(3)")({"image": image(6, 12)}, rng())["image"]
    assert out.shape == (3, 6, 3)


def test_central_crop_is_the_middle_window():
    pixels = image(6, 8)
    out = op("central_crop((2, 4))")({"image": pixels}, rng())["image"]
    np.testing.assert_array_equal(out, pixels[2:4, 2:6])


def _window_position(big, small):
    h, w = small.shape[:2]
    return [
        (i, j)
        for i in range(big.shape[0] - h + 1)
        for j in range(big.shape[1] - w + 1)
        if np.array_equal(big[i : i + h, j : j + w], small)
    ]


def test_random_crop_is_a_window_of_the_image_at_a_seeded_position():
    pixels = image(10, 10)
    crop = op("random_crop(4)")
    positions = {
        _window_position(pixels, crop({"image": pixels}, rng(s))["image"])[0] for s in range(30)
    }
    assert len(positions) > 5  # the position varies with the rng
    again = crop({"image": pixels}, rng(3))["image"]
    np.testing.assert_array_equal(again, crop({"image": pixels}, rng(3))["image"])


def test_random_crop_larger_than_the_image_is_an_error():
    with pytest.raises(
        ValueError,
        match=r"random_crop: image of shape \(6, 8, 3\) is smaller than the crop \(7, 7\)",
    ):
        op("random_crop(7)")({"image": image()}, rng())


def test_inception_crop_covers_the_allowed_area_and_aspect():
    pixels = np.zeros((100, 100, 1), np.uint8)
    crop = op("inception_crop(area_min=20, area_max=50)")
    for seed in range(20):
        h, w = crop({"image": pixels}, rng(seed))["image"].shape[:2]
        assert 0.19 * 100 * 100 <= h * w <= 0.51 * 100 * 100
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_inception_crop_resizes_to_size():
    out = op("inception_crop(16)")({"image": image(40, 30)}, rng())["image"]
    assert out.shape == (16, 16, 3)


def test_inception_crop_bad_area():
    with pytest.raises(ValueError, match=r"inception_crop: need 0 < area_min=60 <= area_max=50"):
        op("inception_crop(area_min=60, area_max=50)")


def test_flip_lr_flips_with_its_probability():
    pixels = image()
    np.testing.assert_array_equal(
        op("flip_lr(1.0)")({"image": pixels}, rng())["image"], pixels[:, ::-1]
    )
    np.testing.assert_array_equal(op("flip_lr(0.0)")({"image": pixels}, rng())["image"], pixels)
    generator = rng()
    flips = sum(
        not np.array_equal(op("flip_lr")({"image": pixels}, generator)["image"], pixels)
        for _ in range(400)
    )
    assert 160 < flips < 240


# values


def test_value_range_maps_0_255_to_minus_1_1():
    pixels = np.array([0, 51, 255], np.uint8).reshape(1, 3, 1)
    out = op("value_range(-1, 1)")({"image": pixels}, rng())["image"]
    np.testing.assert_allclose(out.ravel(), [-1, 51 / 255 * 2 - 1, 1], rtol=1e-6)
    assert out.dtype == np.float32


def test_value_range_with_input_range():
    out = op("value_range(0, 1, in_min=0, in_max=16)")(
        {"image": np.full((1, 1, 1), 4, np.uint8)}, rng()
    )
    assert out["image"].item() == pytest.approx(0.25)


def test_value_range_bad_range():
    with pytest.raises(ValueError, match=r"value_range: need vmin < vmax"):
        op("value_range(1, -1)")


def test_normalize_per_channel_mean_and_std():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 4, 3)).astype(np.uint8)
    out = op("normalize(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))")({"image": pixels}, rng())
    expected = (pixels / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    np.testing.assert_allclose(out["image"], expected, rtol=1e-5, atol=1e-6)


def test_normalize_channel_count_mismatch():
    with pytest.raises(
        ValueError, match=r"normalize: mean has 3 values for an image with 1 channels"
    ):
        op("normalize")({"image": np.zeros((2, 2, 1), np.uint8)}, rng())


def test_normalize_rejects_zero_std():
    with pytest.raises(ValueError, match=r"normalize: .*std > 0"):
        op("normalize(0.5, 0)")


# labels and structure


def test_onehot_with_on_and_off_values():
    out = op("onehot(4, on=0.9, off=0.1)")({"label": np.int64(2)}, rng())
    np.testing.assert_allclose(out["labels"], [0.1, 0.1, 0.9, 0.1])
    assert out["label"] == 2


def test_onehot_of_a_label_list_is_multi_hot():
    out = op("onehot(4)")({"label": np.array([0, 3])}, rng())
    np.testing.assert_array_equal(out["labels"], [1, 0, 0, 1])


def test_onehot_label_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"onehot: label 5 outside \[0, depth=4\)"):
        op("onehot(4)")({"label": np.int64(5)}, rng())


def test_onehot_rejects_float_labels():
    with pytest.raises(ValueError, match="onehot: 'label' must be an int"):
        op("onehot(4)")({"label": 1.5}, rng())


def test_mixup_blends_each_example_with_its_neighbour():
    batch = {
        "image": np.arange(3, dtype=np.float32)[:, None],
        "labels": np.eye(3, dtype=np.float32),
    }
    out = op("mixup(0.5)")(batch, rng(7))
    lam = rng(7).beta(0.5, 0.5)
    np.testing.assert_allclose(
        out["image"][:, 0], lam * np.array([0, 1, 2]) + (1 - lam) * np.array([2, 0, 1]), rtol=1e-5
    )
    np.testing.assert_allclose(out["labels"].sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(out["labels"][0], [lam, 0, 1 - lam], rtol=1e-5)


def test_mixup_of_integer_images_is_an_error():
    with pytest.raises(ValueError, match="mixup: 'image' has dtype uint8; mix float values"):
        op("mixup")({"image": np.zeros((2, 1), np.uint8), "labels": np.eye(2)}, rng())


def test_mixup_bad_alpha():
    with pytest.raises(ValueError, match=r"mixup: alpha=0 must be > 0"):
        op("mixup(0)")


def test_mixup_of_two_known_images_and_labels_keeps_the_largest_weight():
    images = np.array([[[0.0, 10.0]], [[100.0, 50.0]]], np.float32)  # [2, 1, 2]
    labels = np.array([[1, 0, 1], [0, 1, 0]], np.float32)  # multi-hot (sigmoid) and one-hot
    out = op("mixup(0.5, largest_first=True)")({"image": images, "labels": labels}, rng(3))
    lam = np.float32(rng(3).beta(0.5, 0.5, size=1)[0])
    big, small = max(lam, 1 - lam), min(lam, 1 - lam)
    assert big > 0.5
    # example 0 mixes with example -1 = 1, example 1 with example 0
    np.testing.assert_allclose(
        out["image"], [[[100 * small, 10 * big + 50 * small]], [[100 * big, 50 * big + 10 * small]]]
    )
    np.testing.assert_allclose(out["labels"], [[big, small, big], [small, big, small]])
    assert out["image"].dtype == out["labels"].dtype == np.float32


def test_mixup_groups_mix_only_within_themselves_with_one_draw_each():
    eye = np.eye(6, dtype=np.float32)  # example i is the unit vector e_i
    out = op("mixup(0.3, groups=3)")({"image": eye, "labels": eye}, rng(5))
    lam = rng(5).beta(0.3, 0.3, size=3)
    want = np.zeros((6, 6))
    for group in range(3):
        a, b = 2 * group, 2 * group + 1  # groups of 2: each example's neighbour is the other
        want[a, a] = want[b, b] = lam[group]
        want[a, b] = want[b, a] = 1 - lam[group]
    np.testing.assert_allclose(out["image"], want, rtol=1e-6)
    np.testing.assert_array_equal(out["labels"], out["image"])


def test_mixup_of_size_3_draws_dirichlet_weights():
    eye = np.eye(4, dtype=np.float32)
    out = op("mixup(1.0, size=3, largest_first=True)")({"image": eye, "labels": eye}, rng(2))
    w = -np.sort(-rng(2).dirichlet([1.0] * 3, size=1)[0])
    for i in range(4):  # x'[i] = w0 x[i] + w1 x[i - 1] + w2 x[i - 2]
        want = w[0] * eye[i] + w[1] * eye[i - 1] + w[2] * eye[i - 2]
        np.testing.assert_allclose(out["image"][i], want, rtol=1e-6)


def test_mixup_batch_must_split_into_the_groups():
    batch = {"image": np.zeros((6, 2), np.float32), "labels": np.zeros((6, 3), np.float32)}
    with pytest.raises(
        ValueError, match=r"mixup: the batch of 6 examples does not split into groups=4 equal"
    ):
        op("mixup(groups=4)")(batch, rng())
    with pytest.raises(ValueError, match=r"mixup: 'labels' has shape \(5, 3\) but 'image' has 6"):
        op("mixup")({**batch, "labels": np.zeros((5, 3), np.float32)}, rng())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mixup(groups=0)", r"mixup: groups=0 must be an integer >= 1"),
        ("mixup(size=1)", r"mixup: size=1 must be an integer >= 2"),
        ("mixup(largest_first=1)", r"mixup: largest_first=1 must be True or False"),
    ],
)
def test_mixup_bad_group_arguments(spec, message):
    with pytest.raises(ValueError, match=message):
        op(spec)


def test_keep_drops_other_features():
    out = op("keep('image', 'label')")({"image": 1, "label": 2, "id": 3}, rng())
    assert out == {"image": 1, "label": 2}


def test_keep_missing_feature_is_an_error():
    with pytest.raises(ValueError, match=r"keep: the example has no \['labels'\]"):
        op("keep('labels')")({"label": 1}, rng())


def test_ops_do_not_mutate_their_input():
    example = {"image": image(), "label": np.int64(1)}
    snapshot = {k: np.copy(v) for k, v in example.items()}
    vmoe_data.preprocess("decode|flip_lr(1.0)|random_crop(4)|value_range|onehot(3)")(example, rng())
    assert example.keys() == snapshot.keys()
    for key in example:
        np.testing.assert_array_equal(example[key], snapshot[key])
