"""RandAugment (Cubuk et al. 2019, arXiv:1909.13719) as the V-MoE release runs it.

The release's `randaug(num_layers, magnitude)` op calls `distort_image_with_randaugment` of the
TF TPU models' `autoaugment.py` (big_vision's `randaug` is a fork of the same code). This module
does the same in numpy, on uint8 images `[M, H, W, C]` (C = 1 or 3) before `value_range`:

- Each of `num_layers` layers picks one of the 16 ops of `OPS` uniformly and applies it. Always:
  the TF code draws a probability in [0.2, 0.8) per op and then never uses it.
- Every layer uses `magnitude` as its level, mapped per op with level / 10 and never clipped
  (the release's "strong" recipe uses magnitude 20): rotate by level / 10 * 30 degrees, shear by
  level / 10 * 0.3, translate by level / 10 * 100 pixels (those three with a random sign),
  cutout a square of half-side int(level / 10 * 40) at a uniform centre, enhancement factor
  level / 10 * 1.8 + 0.1 (Color, Contrast, Brightness, Sharpness), Posterize to
  int(level / 10 * 4) bits, Solarize above int(level / 10 * 256), SolarizeAdd
  int(level / 10 * 110) below 128. Pixels that come from outside the image, and cutout, are 128.
- TF's arithmetic is kept: float32 steps truncated to uint8 (`blend`), nearest-neighbour
  sampling rounding half away from zero, per-channel AutoContrast and Equalize (Pillow's rule:
  no change when a channel has one value or the step is 0), a 3x3 smoothing kernel
  [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 for Sharpness with the 1-pixel border kept.
- So are its quirks, which the release trained with: the Solarize threshold is compared as a
  uint8, i.e. modulo 256 (magnitude 10 and 20 invert every pixel); the Posterize shift
  8 - bits is taken as a uint8 and clamped to 7 (magnitudes below 2.5, and from 22.5, keep
  only the top bit); Contrast blends towards a constant of H * W / 256 (the sum of a 256-bin
  histogram over 256, not the mean grey level), capped at 255.
- One-channel images: the grey of Color is the image itself (Color changes nothing); the
  other ops work per channel as on colour images.

Every op at 15 magnitudes from 0 to 30, both signs, 5 image sizes up to 224x224, was checked
equal, pixel for pixel, to that TF code run by TensorFlow 2.15 with tensorflow-addons 0.23
(TF's own kernels, TF_ENABLE_ONEDNN_OPTS=0: oneDNN's depthwise convolution fuses its
multiply-adds, so its Sharpness smoothing can differ by 1 before the blend).

Randomness: per layer, 4 uniform numbers u in [0, 1) per example: the op (floor(16 u)), the
sign (+ if u >= 0.5), the cutout row and column (floor(H u), floor(W u)). The per-example op
draws them from its `rng`, the vectorised form from `vmoe_data.Draws`; both then run the same
batch code, so the same numbers give the same image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from vmoe_data.pp_image import get_image, get_images
from vmoe_data.preprocess import with_vectorized
from vmoe_plugins import check_int, check_number, check_str

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
)
DRAWS_PER_LAYER = 4  # op, sign, cutout row, cutout column
FILL = 128  # pixels from outside the image, and cutout
_MAX_LEVEL = 10.0
_TRANSLATE_CONST = 100  # pixels at level 10
_CUTOUT_CONST = 40  # half-side at level 10


def randaug(num_layers: int = 2, magnitude: float = 10, key: str = "image"):
    """RandAugment: `num_layers` ops drawn from `OPS`, each at `magnitude` (any number >= 0;
    10 is the TF code's maximum level, larger values extrapolate as it does).

    Works on uint8 `[H, W, C]` images with 1 or 3 channels: put it before `value_range`.
    """
    num_layers = check_int("num_layers", num_layers, 0, where="randaug: ")
    magnitude = check_number("magnitude", magnitude, at_least=0, where="randaug: ")
    check_str("key", key, "randaug: ")
    ops = layer_ops(float(magnitude))
    columns = num_layers * DRAWS_PER_LAYER

    def op(example, rng):
        image = _checked(get_image(example, key, "randaug", ("uint8",))[None])
        if not num_layers:
            return example
        unit = rng.uniform(size=(1, columns))
        return {**example, key: augment(image, unit, ops)[0]}

    def vectorized(batch, draws):
        images = _checked(get_images(batch, key, "randaug", ("uint8",)))
        if not num_layers:
            return batch
        return {**batch, key: augment(images, draws.uniform(size=columns), ops)}

    return with_vectorized(op, vectorized)


def _checked(images: np.ndarray) -> np.ndarray:
    if images.shape[-1] not in (1, 3):
        raise ValueError(
            f"randaug: the image has {images.shape[-1]} channels; expected 1 or 3 (use "
            "decode(channels=1) or decode(channels=3))"
        )
    return images


LayerOp = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def augment(images: np.ndarray, unit: np.ndarray, ops: list[LayerOp]) -> np.ndarray:
    """images uint8 [M, H, W, C], unit float [M, layers * 4] in [0, 1) -> augmented images.

    `ops` is `layer_ops(magnitude)`. Row m is augmented with its own numbers `unit[m]` only
    (see the module docstring).
    """
    count, height, width = images.shape[:3]
    layers = unit.reshape(count, -1, DRAWS_PER_LAYER)
    for u in layers.transpose(1, 0, 2):  # one layer: u [M, 4]
        which = np.minimum((u[:, 0] * len(OPS)).astype(np.int64), len(OPS) - 1)
        sign = np.where(u[:, 1] >= 0.5, np.float32(1), np.float32(-1))
        row = np.minimum((u[:, 2] * height).astype(np.int64), height - 1)
        col = np.minimum((u[:, 3] * width).astype(np.int64), width - 1)
        out = np.empty_like(images)
        for index in np.unique(which):
            rows = which == index
            out[rows] = ops[index](images[rows], sign[rows], row[rows], col[rows])
        images = out
    return images


def layer_ops(level: float) -> list[LayerOp]:
    """The 16 ops at magnitude `level`, in the order of `OPS`: op(images, sign, row, col)."""
    degrees = np.float32((level / _MAX_LEVEL) * 30.0)
    shear = np.float32((level / _MAX_LEVEL) * 0.3)
    pixels = np.float32((level / _MAX_LEVEL) * float(_TRANSLATE_CONST))
    factor = (level / _MAX_LEVEL) * 1.8 + 0.1
    bits = int((level / _MAX_LEVEL) * 4)
    threshold = int((level / _MAX_LEVEL) * 256)
    addition = int((level / _MAX_LEVEL) * 110)
    pad = int((level / _MAX_LEVEL) * _CUTOUT_CONST)
    return [
        lambda x, sign, row, col: autocontrast(x),
        lambda x, sign, row, col: equalize(x),
        lambda x, sign, row, col: invert(x),
        lambda x, sign, row, col: rotate(x, sign * degrees),
        lambda x, sign, row, col: posterize(x, bits),
        lambda x, sign, row, col: solarize(x, threshold),
        lambda x, sign, row, col: color(x, factor),
        lambda x, sign, row, col: contrast(x, factor),
        lambda x, sign, row, col: brightness(x, factor),
        lambda x, sign, row, col: sharpness(x, factor),
        lambda x, sign, row, col: shear_x(x, sign * shear),
        lambda x, sign, row, col: shear_y(x, sign * shear),
        lambda x, sign, row, col: translate_x(x, sign * pixels),
        lambda x, sign, row, col: translate_y(x, sign * pixels),
        lambda x, sign, row, col: cutout(x, pad, row, col),
        lambda x, sign, row, col: solarize_add(x, addition),
    ]


# ---------------------------------------------------------------- the ops: uint8 [M, H, W, C]


def autocontrast(x: np.ndarray) -> np.ndarray:
    """Per image and channel, maps [min, max] linearly onto [0, 255] (unchanged if min == max)."""
    lo = x.min(axis=(1, 2), keepdims=True).astype(np.float32)
    hi = x.max(axis=(1, 2), keepdims=True).astype(np.float32)
    scale = np.float32(255.0) / np.where(hi > lo, hi - lo, np.float32(1))
    offset = -lo * scale
    scaled = np.clip(x.astype(np.float32) * scale + offset, 0.0, 255.0).astype(np.uint8)
    return np.where(hi > lo, scaled, x)


def equalize(x: np.ndarray) -> np.ndarray:
    """Per image and channel, Pillow's histogram equalisation (unchanged when its step is 0)."""
    count, height, width, channels = x.shape
    planes = x.transpose(0, 3, 1, 2).reshape(count * channels, height * width).astype(np.int64)
    offsets = np.arange(count * channels)[:, None] * 256
    histo = np.bincount((planes + offsets).ravel(), minlength=count * channels * 256)
    histo = histo.reshape(count * channels, 256)
    last = 255 - np.argmax(histo[:, ::-1] > 0, axis=1)  # the last non-empty bin
    step = (height * width - histo[np.arange(len(histo)), last]) // 255
    safe = np.maximum(step, 1)[:, None]
    lut = (np.cumsum(histo, axis=1) + safe // 2) // safe
    lut = np.clip(np.concatenate([np.zeros_like(lut[:, :1]), lut[:, :-1]], axis=1), 0, 255)
    out = np.where(step[:, None] > 0, np.take_along_axis(lut, planes, axis=1), planes)
    return out.reshape(count, channels, height, width).transpose(0, 2, 3, 1).astype(np.uint8)


def invert(x: np.ndarray) -> np.ndarray:
    return 255 - x


def posterize(x: np.ndarray, bits: int) -> np.ndarray:
    """Keeps the top `bits` bits; the shift 8 - bits is a uint8 clamped to 7, as in TF."""
    shift = np.uint8(min((8 - bits) % 256, 7))
    return (x >> shift) << shift


def solarize(x: np.ndarray, threshold: int) -> np.ndarray:
    """Inverts the pixels >= threshold, the threshold taken modulo 256 (a uint8, as in TF)."""
    return np.where(x < threshold % 256, x, 255 - x)


def solarize_add(x: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
    """Adds `addition` (clipped to [0, 255]) to the pixels below `threshold`."""
    added = np.clip(x.astype(np.int64) + addition, 0, 255).astype(np.uint8)
    return np.where(x < threshold, added, x)


def blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
    """image1 + factor * (image2 - image1) in float32, truncated to uint8 (clipped when
    extrapolating, factor > 1): TF autoaugment's `blend`, which every enhance op uses."""
    if factor == 0.0:
        return image1
    if factor == 1.0:
        return image2
    one = image1.astype(np.float32)
    temp = one + np.float32(factor) * (image2.astype(np.float32) - one)
    if 0.0 < factor < 1.0:
        return temp.astype(np.uint8)
    return np.clip(temp, 0.0, 255.0).astype(np.uint8)


def grayscale(x: np.ndarray) -> np.ndarray:
    """uint8 grey [M, H, W, 1] as tf.image.rgb_to_grayscale (a 1-channel image is its grey)."""
    if x.shape[-1] == 1:
        return x
    flt = x.astype(np.float32) * np.float32(1.0 / 255)
    red, green, blue = (flt[..., c] * np.float32(w) for c, w in enumerate(_GREY_WEIGHTS))
    return ((red + green + blue) * np.float32(255.5)).astype(np.uint8)[..., None]


_GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)


def color(x: np.ndarray, factor: float) -> np.ndarray:
    return blend(np.repeat(grayscale(x), x.shape[-1], axis=-1), x, factor)


def contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """Blends towards the constant min(H * W / 256, 255) (TF's histogram quirk)."""
    value = min(np.float32(x.shape[1] * x.shape[2]) / np.float32(256.0), np.float32(255.0))
    return blend(np.full_like(x, np.uint8(value)), x, factor)


def brightness(x: np.ndarray, factor: float) -> np.ndarray:
    return blend(np.zeros_like(x), x, factor)


def sharpness(x: np.ndarray, factor: float) -> np.ndarray:
    """Blends with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 inside its
    1-pixel border (the border keeps its pixels)."""
    height, width = x.shape[1:3]
    degenerate = x.copy()
    if height >= 3 and width >= 3:
        flt = x.astype(np.float32)
        side, centre = np.float32(1) / np.float32(13), np.float32(5) / np.float32(13)
        total = np.zeros_like(flt[:, 1:-1, 1:-1])
        for dy in range(3):  # row-major order, one float32 product-sum at a time
            for dx in range(3):
                weight = centre if dy == dx == 1 else side
                total = total + flt[:, dy : dy + height - 2, dx : dx + width - 2] * weight
        degenerate[:, 1:-1, 1:-1] = np.clip(total, 0.0, 255.0).astype(np.uint8)
    return blend(degenerate, x, factor)


def rotate(x: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Rotates image m by degrees[m] about its centre (tfa.image.rotate's transform)."""
    height, width = (np.float32(n - 1) for n in x.shape[1:3])
    radians = np.asarray(degrees, np.float32) * np.float32(math.pi / 180.0)
    cos = np.cos(radians.astype(np.float64)).astype(np.float32)
    sin = np.sin(radians.astype(np.float64)).astype(np.float32)
    x_offset = (width - (cos * width - sin * height)) / np.float32(2.0)
    y_offset = (height - (sin * width + cos * height)) / np.float32(2.0)
    return transform(x, (cos, -sin, x_offset, sin, cos, y_offset))


def shear_x(x: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Pixel (row, col) takes input (row, col + level * row)."""
    one, zero = np.ones_like(level), np.zeros_like(level)
    return transform(x, (one, level, zero, zero, one, zero))


def shear_y(x: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Pixel (row, col) takes input (row + level * col, col)."""
    one, zero = np.ones_like(level), np.zeros_like(level)
    return transform(x, (one, zero, zero, level, one, zero))


def translate_x(x: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Pixel (row, col) takes input (row, col + pixels): the content moves left."""
    one, zero = np.ones_like(pixels), np.zeros_like(pixels)
    return transform(x, (one, zero, pixels, zero, one, zero))


def translate_y(x: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Pixel (row, col) takes input (row + pixels, col): the content moves up."""
    one, zero = np.ones_like(pixels), np.zeros_like(pixels)
    return transform(x, (one, zero, zero, zero, one, pixels))


def transform(x: np.ndarray, coefficients) -> np.ndarray:
    """Affine resampling, nearest neighbour, FILL outside: output pixel (row, col) of image m
    takes input (a*col + b*row + c, d*col + e*row + f) as (column, row), the six coefficients
    float32 [M] each, evaluated left to right in float32 as TF's ImageProjectiveTransform."""
    count, height, width = x.shape[:3]
    a, b, c, d, e, f = (np.asarray(v, np.float32)[:, None, None] for v in coefficients)
    cols = np.arange(width, dtype=np.float32)[None, None, :]
    rows = np.arange(height, dtype=np.float32)[None, :, None]
    source_col = _round_half_away(a * cols + b * rows + c)
    source_row = _round_half_away(d * cols + e * rows + f)
    inside = (source_row >= 0) & (source_row < height) & (source_col >= 0) & (source_col < width)
    index = np.arange(count)[:, None, None]
    pixels = x[index, np.clip(source_row, 0, height - 1), np.clip(source_col, 0, width - 1)]
    return np.where(inside[..., None], pixels, np.uint8(FILL))


def _round_half_away(values: np.ndarray) -> np.ndarray:
    """std::round: to the nearest integer, halves away from zero (np.round goes to even)."""
    values = values.astype(np.float64)  # float32 -> float64 is exact, so is values - floor
    floor = np.floor(values)
    frac = values - floor
    return (floor + ((frac > 0.5) | ((frac == 0.5) & (values >= 0)))).astype(np.int64)


def cutout(x: np.ndarray, pad: int, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Sets rows [row - pad, row + pad) x columns [col - pad, col + pad) (inside the image) to
    FILL, centred at (row[m], col[m]) in image m."""
    height, width = x.shape[1:3]
    rows, cols = np.arange(height)[None, :], np.arange(width)[None, :]
    in_rows = (rows >= row[:, None] - pad) & (rows < row[:, None] + pad)  # [M, H]
    in_cols = (cols >= col[:, None] - pad) & (cols < col[:, None] + pad)  # [M, W]
    hole = in_rows[:, :, None, None] & in_cols[:, None, :, None]
    return np.where(hole, np.uint8(FILL), x)
