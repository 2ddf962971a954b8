"""Crop-and-resize of a whole batch at once, with Pillow's filters: the vectorised ops' resize.

Pillow resizes one image at a time; a batch of small images spends more time in Python than in
Pillow. Here each output row (column) is a weighted sum of input rows (columns), with the
weights Pillow's resampler computes (the same filters, support widened when downscaling, the
same window and normalisation), so a crop box and a resize become two matrix products per
image, done for the whole batch by `np.matmul`. Floats match Pillow's float resize to float32
rounding. uint8 images are summed in float32 and rounded once (half up, as Pillow), where Pillow
rounds and clips to 8 bits between its two passes: one axis alone is Pillow's result up to
float32-vs-fixed-point rounding; two axes are the exact resize rounded, within 1 of Pillow's for
bilinear and area, and further for bicubic and lanczos, whose overshoot Pillow clips halfway.

The dense weight matrices cost O(out x in) per axis: fine for the small images that pipelines
hold in memory, wasteful for large ones (which take the per-example Pillow path anyway).
"""

from __future__ import annotations

import numpy as np


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)


# method -> (filter, support), as Pillow defines them.
FILTERS = {
    "bilinear": (_triangle, 1.0),
    "area": (_box, 0.5),
    "bicubic": (_cubic, 2.0),
    "lanczos": (_lanczos, 3.0),
}
METHODS = tuple(FILTERS)  # nearest is not here: Pillow picks its pixels in fixed point


def axis_weights(
    start: np.ndarray, size: np.ndarray, full: int, out: int, method: str
) -> np.ndarray:
    """float32 [L, out, full]: output pixel i of example l is `weights[l, i] @ input_line`,
    resampling the window `start[l] .. start[l] + size[l]` of an axis of length `full`."""
    start = np.asarray(start, np.int64)[:, None, None]  # [L, 1, 1]
    size = np.asarray(size, np.float64)[:, None, None]
    scale = size / out
    # Window coordinates, as Pillow sees the cropped image: its pixels 0 .. size - 1 (so the
    # box filter's edges fall where Pillow's do, to the last bit).
    centers = (np.arange(out, dtype=np.float64)[None, :, None] + 0.5) * scale  # [L, out, 1]
    pixels = (np.arange(full)[None, None, :] - start).astype(np.float64)  # [L, 1, full]
    kernel, support = FILTERS[method]
    stretch = np.maximum(scale, 1.0)  # widen the filter to downscale
    reach = support * stretch
    lo = np.maximum(np.floor(centers - reach + 0.5), 0.0)
    hi = np.minimum(np.floor(centers + reach + 0.5), size)
    weights = kernel((pixels - centers + 0.5) / stretch)
    weights = np.where((pixels >= lo) & (pixels < hi), weights, 0.0)
    total = weights.sum(-1, keepdims=True)
    return (weights / np.where(total == 0, 1.0, total)).astype(np.float32)


def crop_resize(
    images: np.ndarray,
    top: np.ndarray,
    left: np.ndarray,
    height: np.ndarray,
    width: np.ndarray,
    out: tuple[int, int],
    method: str,
) -> np.ndarray:
    """images [L, H, W, C] -> [L, out_h, out_w, C]: example l's window (top, left, height,
    width) resized to `out`; uint8 in, uint8 out (rounded, clipped), floats keep their dtype."""
    rows = axis_weights(top, height, images.shape[1], out[0], method)  # [L, oh, H]
    cols = axis_weights(left, width, images.shape[2], out[1], method)  # [L, ow, W]
    mixed = np.matmul(cols[:, None], images.astype(np.float32))  # [L, H, ow, C]
    count, _, out_w, channels = mixed.shape
    mixed = np.matmul(rows, mixed.reshape(count, -1, out_w * channels))  # [L, oh, ow * C]
    mixed = mixed.reshape(count, out[0], out_w, channels)
    if images.dtype == np.uint8:
        return np.clip(np.floor(mixed + 0.5), 0, 255).astype(np.uint8)  # half up, as Pillow
    return mixed.astype(images.dtype)
