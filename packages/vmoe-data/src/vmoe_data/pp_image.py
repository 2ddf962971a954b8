"""Built-in image ops. Each factory checks its arguments and returns `op(example, rng)`.

Images are numpy arrays `[H, W, C]`: uint8 0..255 until `value_range` / `normalize`, which
return float32. Geometry ops keep the dtype. Resizing uses Pillow.

Every op but `resize(method="nearest")`, `resize_small(method="nearest")` and `inception_crop`
without a size also has a vectorised form (`op.vectorized(batch, draws)`, see
`vmoe_data.with_vectorized`) for stacked batches `[L, H, W, C]`, which pipelines use for
in-memory splits. Its resize is `vmoe_data.resample` (Pillow's filters, done as matrix
products); its random ops draw the same distributions from `vmoe_data.Draws`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vmoe_data.preprocess import with_vectorized
from vmoe_data.resample import METHODS as VECTORIZED_METHODS
from vmoe_data.resample import crop_resize
from vmoe_plugins import check_int, check_number, check_str, is_int

_METHODS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}


def get_image(example: dict, key: str, op: str, dtypes: Sequence[str] = ()) -> np.ndarray:
    """`example[key]` checked to be an `[H, W, C]` array (with a dtype in `dtypes` if given)."""
    if key not in example:
        raise ValueError(f"{op}: the example has no {key!r}; keys: {sorted(example)}")
    image = example[key]
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"{op}: {key!r} is a {type(image).__name__}, not an [H, W, C] array; "
            "start the pp spec with decode"
        )
    if image.ndim != 3:
        raise ValueError(
            f"{op}: {key!r} has rank {image.ndim} (shape {image.shape}); expected rank 3 "
            "[H, W, C] (decode turns [H, W] into [H, W, 1])"
        )
    if dtypes and image.dtype.name not in dtypes:
        raise ValueError(f"{op}: {key!r} has dtype {image.dtype}; expected one of {list(dtypes)}")
    return image


def get_images(batch: dict, key: str, op: str, dtypes: Sequence[str] = ()) -> np.ndarray:
    """`batch[key]` checked to be a stacked `[L, H, W, C]` array (vectorised forms' input)."""
    if key not in batch:
        raise ValueError(f"{op}: the batch has no {key!r}; keys: {sorted(batch)}")
    images = batch[key]
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        shown = images.shape if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{op}: {key!r} must be a stacked [L, H, W, C] array; got {shown}")
    if dtypes and images.dtype.name not in dtypes:
        raise ValueError(f"{op}: {key!r} has dtype {images.dtype}; expected one of {list(dtypes)}")
    return images


def _size(size: int | Sequence[int], op: str) -> tuple[int, int]:
    """`32` -> (32, 32); `(24, 32)` -> (24, 32) as (height, width)."""
    if is_int(size):
        sizes = (size, size)
    elif isinstance(size, (tuple, list)):
        sizes = tuple(size)
    else:
        sizes = ()
    if len(sizes) != 2 or not all(is_int(s) and s > 0 for s in sizes):
        raise ValueError(f"{op}: size={size!r} must be a positive integer or (height, width)")
    return int(sizes[0]), int(sizes[1])


def decode(channels: int | None = None, key: str = "image"):
    """Encoded bytes (PNG, JPEG, ...) or an `[H, W]` / `[H, W, C]` uint8 array -> uint8 [H, W, C].

    Encoded images keep their colour kind: grayscale gives 1 channel, colour (RGB, palette,
    CMYK, ...) 3. Alpha is dropped (LA -> 1 channel, RGBA -> 3) and 16-bit images are scaled to
    8 bits (value >> 8); floating-point images are an error. `channels=3` makes grayscale
    images RGB, `channels=1` makes colour images grayscale: give one when a dataset mixes
    grayscale and colour images, so that its images stack into batches.
    """
    if isinstance(channels, bool) or (channels is not None and channels not in (1, 3)):
        raise ValueError(f"decode: channels={channels!r} must be None, 1 or 3")
    check_str("key", key, "decode: ")

    def op(example, rng):
        if key not in example:
            raise ValueError(f"decode: the example has no {key!r}; keys: {sorted(example)}")
        value = example[key]
        if isinstance(value, (bytes, np.bytes_)) or (
            isinstance(value, np.ndarray) and value.dtype.kind in "SO"
        ):
            image = _decode_bytes(bytes(value.item() if isinstance(value, np.ndarray) else value))
        elif isinstance(value, np.ndarray):
            image = value[..., None] if value.ndim == 2 else value
            get_image({key: image}, key, "decode", dtypes=("uint8",))
        else:
            raise ValueError(
                f"decode: {key!r} is a {type(value).__name__}; expected encoded image bytes "
                "or a uint8 [H, W] / [H, W, C] array"
            )
        return {**example, key: _to_channels(image, channels)}

    def vectorized(batch, draws):
        if key not in batch:
            raise ValueError(f"decode: the batch has no {key!r}; keys: {sorted(batch)}")
        images = batch[key]
        if isinstance(images, np.ndarray) and images.ndim == 3:  # [L, H, W]: one channel
            images = images[..., None]
        images = get_images({key: images}, key, "decode", dtypes=("uint8",))
        return {**batch, key: _to_channels(images, channels)}

    return with_vectorized(op, vectorized)


_GRAY_MODES = ("1", "L", "LA", "La")
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _decode_bytes(data: bytes) -> np.ndarray:
    """uint8 [H, W, 1] (grayscale) or [H, W, 3] (colour) pixels of an encoded image."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            pil.load()
            mode = pil.mode
            if mode in _16_BIT_MODES:
                pixels = np.asarray(pil)
            elif mode in _GRAY_MODES:
                pixels = np.asarray(pil.convert("L"))
            elif mode != "F":
                pixels = np.asarray(pil.convert("RGB"))
    except Exception as error:  # Pillow raises several types
        raise ValueError(f"decode: cannot decode {len(data)} bytes as an image: {error}") from None
    if mode == "F":
        raise ValueError(
            "decode: the image has floating-point pixels (Pillow mode 'F'); only 8- and 16-bit "
            "images are supported"
        )
    if mode in _16_BIT_MODES:
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ValueError(
                f"decode: the image has 32-bit pixels in [{pixels.min()}, {pixels.max()}] "
                "(Pillow mode 'I'); only 8- and 16-bit images are supported"
            )
        pixels = (pixels.astype(np.uint32) >> 8).astype(np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _to_channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    have = image.shape[-1]
    if channels is None or have == channels:
        return image
    if channels == 3 and have == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 1 and have in (3, 4):
        luma = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.round(luma).astype(np.uint8)[..., None]
    if channels == 3 and have == 4:
        return image[..., :3]
    raise ValueError(f"decode: cannot turn {have} channels into {channels}")


def _resize(image: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    resample = _METHODS[method]
    if image.dtype == np.uint8 and image.shape[-1] in (1, 3, 4):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out = np.asarray(pil.resize((width, height), resample))
        return out.reshape(height, width, image.shape[-1])
    channels = [
        np.asarray(
            Image.fromarray(image[..., c].astype(np.float32), mode="F").resize(
                (width, height), resample
            )
        )
        for c in range(image.shape[-1])
    ]
    out = np.stack(channels, axis=-1)
    if image.dtype == np.uint8:
        out = np.clip(np.round(out), 0, 255)
    return out.astype(image.dtype)


def _check_method(method: str, op: str) -> None:
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"{op}: method={method!r} is not one of {sorted(_METHODS)}")


def resize(size: int | Sequence[int], method: str = "bilinear", key: str = "image"):
    """Resizes to `size` (int: square; or (height, width))."""
    height, width = _size(size, "resize")
    _check_method(method, "resize")
    check_str("key", key, "resize: ")

    def op(example, rng):
        image = get_image(example, key, "resize")
        return {**example, key: _resize(image, height, width, method)}

    def vectorized(batch, draws):
        images = get_images(batch, key, "resize")
        return {**batch, key: _resize_batch(images, height, width, method)}

    return _vectorized_unless_nearest(op, vectorized, method)


def resize_small(size: int, method: str = "area", key: str = "image"):
    """Resizes so the shorter side is `size`, keeping the aspect ratio."""
    size = check_int("size", size, 1, where="resize_small: ")
    _check_method(method, "resize_small")
    check_str("key", key, "resize_small: ")

    def op(example, rng):
        image = get_image(example, key, "resize_small")
        return {**example, key: _resize(image, *_small_size(*image.shape[:2], size), method)}

    def vectorized(batch, draws):
        images = get_images(batch, key, "resize_small")
        out = _small_size(*images.shape[1:3], size)
        return {**batch, key: _resize_batch(images, *out, method)}

    return _vectorized_unless_nearest(op, vectorized, method)


def _small_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) scaled so that the shorter side is `size`."""
    scale = size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize_batch(images: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """`_resize` of every image of a stacked batch (same size in, same size out)."""
    count, full_h, full_w = images.shape[:3]
    if (full_h, full_w) == (height, width):
        return images
    zeros = np.zeros(count, np.int64)
    return crop_resize(
        images, zeros, zeros, zeros + full_h, zeros + full_w, (height, width), method
    )


def _vectorized_unless_nearest(op, vectorized, method: str):
    return with_vectorized(op, vectorized) if method in VECTORIZED_METHODS else op


def _crop(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    return image[top : top + height, left : left + width]


def _fits(image: np.ndarray, height: int, width: int, op: str) -> None:
    if image.shape[0] < height or image.shape[1] < width:
        raise ValueError(
            f"{op}: image of shape {image.shape} is smaller than the crop ({height}, {width}); "
            "resize first"
        )


def central_crop(size: int | Sequence[int], key: str = "image"):
    """Crops the central `size` window."""
    height, width = _size(size, "central_crop")
    check_str("key", key, "central_crop: ")

    def op(example, rng):
        image = get_image(example, key, "central_crop")
        _fits(image, height, width, "central_crop")
        top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
        return {**example, key: _crop(image, top, left, height, width)}

    def vectorized(batch, draws):
        images = get_images(batch, key, "central_crop")
        _fits(images[0], height, width, "central_crop")
        top, left = (images.shape[1] - height) // 2, (images.shape[2] - width) // 2
        return {**batch, key: images[:, top : top + height, left : left + width]}

    return with_vectorized(op, vectorized)


def random_crop(size: int | Sequence[int], key: str = "image"):
    """Crops a `size` window at a uniformly random position."""
    height, width = _size(size, "random_crop")
    check_str("key", key, "random_crop: ")

    def op(example, rng):
        image = get_image(example, key, "random_crop")
        _fits(image, height, width, "random_crop")
        top = int(rng.integers(0, image.shape[0] - height + 1))
        left = int(rng.integers(0, image.shape[1] - width + 1))
        return {**example, key: _crop(image, top, left, height, width)}

    def vectorized(batch, draws):
        images = get_images(batch, key, "random_crop")
        _fits(images[0], height, width, "random_crop")
        top = draws.integers(0, images.shape[1] - height + 1)
        left = draws.integers(0, images.shape[2] - width + 1)
        return {**batch, key: _crop_batch(images, top, left, height, width)}

    return with_vectorized(op, vectorized)


def _crop_batch(
    images: np.ndarray, top: np.ndarray, left: np.ndarray, height: int, width: int
) -> np.ndarray:
    """images [L, H, W, C] -> [L, height, width, C]: example l's window at (top[l], left[l])."""
    rows = top[:, None, None] + np.arange(height)[None, :, None]
    cols = left[:, None, None] + np.arange(width)[None, None, :]
    return images[np.arange(len(images))[:, None, None], rows, cols]


def inception_crop(
    size: int | Sequence[int] | None = None,
    area_min: float = 5,
    area_max: float = 100,
    method: str = "bilinear",
    key: str = "image",
):
    """Inception-style crop: a random window covering area_min..area_max % of the image with
    aspect ratio in [3/4, 4/3] (log-uniform), resized to `size` if given.

    Ten tries to fit a window; if none fits, the central square crop is used.
    """
    out_size = None if size is None else _size(size, "inception_crop")
    area_min = check_number("area_min", area_min, where="inception_crop: ")
    area_max = check_number("area_max", area_max, where="inception_crop: ")
    check_str("key", key, "inception_crop: ")
    if not 0 < area_min <= area_max <= 100:
        raise ValueError(
            f"inception_crop: need 0 < area_min={area_min!r} <= area_max={area_max!r} <= 100"
        )
    _check_method(method, "inception_crop")
    log_ratio = (math.log(3 / 4), math.log(4 / 3))

    def op(example, rng):
        image = get_image(example, key, "inception_crop")
        h, w = image.shape[:2]
        for _ in range(10):
            area = h * w * rng.uniform(area_min, area_max) / 100
            ratio = math.exp(rng.uniform(*log_ratio))
            crop_w = round(math.sqrt(area * ratio))
            crop_h = round(math.sqrt(area / ratio))
            if 0 < crop_w <= w and 0 < crop_h <= h:
                top = int(rng.integers(0, h - crop_h + 1))
                left = int(rng.integers(0, w - crop_w + 1))
                break
        else:
            crop_h = crop_w = min(h, w)
            top, left = (h - crop_h) // 2, (w - crop_w) // 2
        crop = _crop(image, top, left, crop_h, crop_w)
        if out_size is not None:
            crop = _resize(crop, *out_size, method)
        return {**example, key: crop}

    def vectorized(batch, draws):
        images = get_images(batch, key, "inception_crop")
        h, w = images.shape[1:3]
        tries = 10
        area = h * w * draws.uniform(area_min, area_max, size=tries) / 100  # [L, tries]
        ratio = np.exp(draws.uniform(*log_ratio, size=tries))
        widths = np.round(np.sqrt(area * ratio)).astype(np.int64)  # half to even, as round()
        heights = np.round(np.sqrt(area / ratio)).astype(np.int64)
        fits = (widths > 0) & (widths <= w) & (heights > 0) & (heights <= h)
        first = np.argmax(fits, axis=1)  # the first try that fits
        found = fits.any(axis=1)
        rows = np.arange(len(images))
        side = min(h, w)
        crop_h = np.where(found, heights[rows, first], side)
        crop_w = np.where(found, widths[rows, first], side)
        top = np.where(found, draws.integers(0, h - crop_h + 1), (h - side) // 2)
        left = np.where(found, draws.integers(0, w - crop_w + 1), (w - side) // 2)
        return {**batch, key: crop_resize(images, top, left, crop_h, crop_w, out_size, method)}

    if out_size is None:  # crops of different sizes do not stack
        return op
    return with_vectorized(op, vectorized)


def flip_lr(probability: float = 0.5, key: str = "image"):
    """Flips left-right with `probability`."""
    probability = check_number("probability", probability, where="flip_lr: ")
    check_str("key", key, "flip_lr: ")
    if not 0 <= probability <= 1:
        raise ValueError(f"flip_lr: probability={probability!r} must be in [0, 1]")

    def op(example, rng):
        image = get_image(example, key, "flip_lr")
        if rng.uniform() < probability:
            image = image[:, ::-1]
        return {**example, key: image}

    def vectorized(batch, draws):
        images = get_images(batch, key, "flip_lr")
        flip = (draws.uniform() < probability)[:, None, None, None]
        return {**batch, key: np.where(flip, images[:, :, ::-1], images)}

    return with_vectorized(op, vectorized)


def value_range(
    vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255, key: str = "image"
):
    """Maps pixel values linearly from [in_min, in_max] to [vmin, vmax]: float32."""
    vmin, vmax, in_min, in_max = (
        check_number(name, value, where="value_range: ")
        for name, value in [("vmin", vmin), ("vmax", vmax), ("in_min", in_min), ("in_max", in_max)]
    )
    check_str("key", key, "value_range: ")
    if not (vmin < vmax and in_min < in_max):
        raise ValueError(
            f"value_range: need vmin < vmax and in_min < in_max; got vmin={vmin!r}, "
            f"vmax={vmax!r}, in_min={in_min!r}, in_max={in_max!r}"
        )
    scale = (vmax - vmin) / (in_max - in_min)

    def rescale(image):
        out = (image.astype(np.float32) - np.float32(in_min)) * np.float32(scale)
        return out + np.float32(vmin)

    def op(example, rng):
        return {**example, key: rescale(get_image(example, key, "value_range", _NUMERIC))}

    def vectorized(batch, draws):
        return {**batch, key: rescale(get_images(batch, key, "value_range", _NUMERIC))}

    return with_vectorized(op, vectorized)


def normalize(
    mean: float | Sequence[float] = (0.485, 0.456, 0.406),
    std: float | Sequence[float] = (0.229, 0.224, 0.225),
    scale: float = 255,
    key: str = "image",
):
    """(image / scale - mean) / std per channel: float32. Defaults: ImageNet statistics."""
    mean_c = _per_channel("mean", mean)
    std_c = _per_channel("std", std)
    scale = check_number("scale", scale, where="normalize: ")
    check_str("key", key, "normalize: ")
    if not np.all(std_c > 0) or scale <= 0:
        raise ValueError(
            f"normalize: mean={mean!r} and std={std!r} must be numbers or per-channel lists, "
            f"std > 0 and scale={scale!r} > 0"
        )

    def standardise(image):
        for name, stat in (("mean", mean_c), ("std", std_c)):
            if len(stat) not in (1, image.shape[-1]):
                raise ValueError(
                    f"normalize: {name} has {len(stat)} values for an image with "
                    f"{image.shape[-1]} channels"
                )
        return (image.astype(np.float32) / np.float32(scale) - mean_c) / std_c

    def op(example, rng):
        return {**example, key: standardise(get_image(example, key, "normalize", _NUMERIC))}

    def vectorized(batch, draws):
        return {**batch, key: standardise(get_images(batch, key, "normalize", _NUMERIC))}

    return with_vectorized(op, vectorized)


def _per_channel(name: str, value) -> np.ndarray:
    """A number or a non-empty list of numbers -> float32 [C]."""
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    if not values:
        raise ValueError(f"normalize: {name}={value!r} must be a number or a list of numbers")
    try:
        numbers = [check_number(name, v) for v in values]
    except ValueError:
        raise ValueError(
            f"normalize: {name}={value!r} must be a number or a list of numbers"
        ) from None
    return np.asarray(numbers, np.float32)


_NUMERIC = ("uint8", "uint16", "int32", "float16", "float32", "float64")
