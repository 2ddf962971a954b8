"""Built-in label and structure ops: onehot, mixup (a batch op), keep."""

from __future__ import annotations

import numpy as np

from vmoe_data.preprocess import batch_op, with_vectorized
from vmoe_plugins import check_bool, check_int, check_number, check_str


def onehot(
    depth: int,
    key: str = "label",
    key_result: str = "labels",
    on: float = 1.0,
    off: float = 0.0,
):
    """Int label(s) in [0, depth) -> float32 [depth] vector at `key_result` (on/off values).

    A scalar label gives a one-hot vector; a 1-D array of labels gives a multi-hot vector.
    """
    depth = check_int("depth", depth, 1, where="onehot: ")
    on = check_number("on", on, where="onehot: ")
    off = check_number("off", off, where="onehot: ")
    check_str("key", key, "onehot: ")
    check_str("key_result", key_result, "onehot: ")

    def encode(values: dict, rank: int, what: str) -> dict:
        """values[key]: rank `rank` (one example) or `rank + 1` int labels -> values[key_result]."""
        if key not in values:
            raise ValueError(f"onehot: the {what} has no {key!r}; keys: {sorted(values)}")
        labels = np.asarray(values[key])
        if labels.dtype.kind not in "iu" or not rank <= labels.ndim <= rank + 1:
            shape = labels.shape[rank:]
            raise ValueError(
                f"onehot: {key!r} must be an int or a 1-D int array; got dtype {labels.dtype} "
                f"shape {shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= depth):
            bad = labels if labels.ndim == 0 else labels[(labels < 0) | (labels >= depth)]
            raise ValueError(f"onehot: label {bad.tolist()} outside [0, depth={depth})")
        lead = labels.shape[:rank]  # () for one example, (L,) for a batch
        vectors = np.full((*lead, depth), off, dtype=np.float32)
        flat = labels.reshape(*lead, -1)  # [..., labels per example]
        np.put_along_axis(vectors, flat, np.float32(on), axis=-1)
        return {**values, key_result: vectors}

    def op(example, rng):
        return encode(example, 0, "example")

    def vectorized(batch, draws):
        return encode(batch, 1, "batch")

    return with_vectorized(op, vectorized)


def mixup(
    alpha: float = 0.2,
    keys: tuple[str, ...] | list[str] = ("image", "labels"),
    groups: int = 1,
    size: int = 2,
    largest_first: bool = False,
):
    """Batch op: mixes each example with its neighbours in the batch (mixup, arXiv:1710.09412).

    The batch (leading axis B) is split into `groups` equal contiguous groups of n = B / groups
    examples. Each group draws its own `size` weights w ~ Dirichlet(alpha, ..., alpha) (for
    size 2: w = (lam, 1 - lam), lam ~ Beta(alpha, alpha)) and mixes only within itself:

        x'[i] = w[0] * x[i] + w[1] * x[i - 1] + ... + w[size - 1] * x[i - size + 1]

    (indices modulo n), the same weights for every key in `keys`: float arrays such as images
    after value_range and `labels` after onehot. Mixing the float label vectors serves both
    losses: for softmax the mixed vector is still a distribution over classes, for sigmoid each
    class's target becomes the mix of the examples' 0/1 targets. `largest_first` sorts each
    draw's weights in decreasing order, so every example keeps the largest share of itself
    (max(lam, 1 - lam) for size 2). Returns float32 arrays.

    The defaults (one group, size 2, unsorted) are lam * x + (1 - lam) * roll(x, 1) with one lam
    per batch. The V-MoE release's mixup (granularity "device", size 2, concentration c: one
    draw per device, mixing within each device's share of the batch, the largest weight kept
    by the example) is `mixup(c, groups=<devices the process's batch is split over>,
    largest_first=True)`; the release mixes example i with i + 1 rather than i - 1, the same in
    distribution since batches are shuffled.
    """
    alpha = check_number("alpha", alpha, where="mixup: ")
    if not alpha > 0:
        raise ValueError(f"mixup: alpha={alpha!r} must be > 0")
    if (
        not isinstance(keys, (tuple, list))
        or not keys
        or not all(isinstance(k, str) and k for k in keys)
    ):
        raise ValueError(f"mixup: keys={keys!r} must be a non-empty list of feature names")
    groups = check_int("groups", groups, 1, where="mixup: ")
    size = check_int("size", size, 2, where="mixup: ")
    largest_first = check_bool("largest_first", largest_first, where="mixup: ")

    def draw(rng: np.random.Generator) -> np.ndarray:
        """float32 [groups, size] weights, each row summing to 1."""
        if size == 2:
            lam = rng.beta(alpha, alpha, size=groups).astype(np.float32)
            weights = np.stack([lam, 1 - lam], axis=1)
        else:
            weights = rng.dirichlet([alpha] * size, size=groups).astype(np.float32)
        return -np.sort(-weights, axis=1) if largest_first else weights

    @batch_op
    def op(batch, rng):
        values = {}
        for key in keys:
            if key not in batch:
                raise ValueError(f"mixup: the batch has no {key!r}; keys: {sorted(batch)}")
            values[key] = np.asarray(batch[key])
            if values[key].dtype.kind != "f":
                raise ValueError(
                    f"mixup: {key!r} has dtype {values[key].dtype}; mix float values (apply "
                    "value_range/normalize to images and onehot to labels first)"
                )
        count = len(values[keys[0]])
        for key, value in values.items():
            if value.ndim == 0 or len(value) != count:
                raise ValueError(
                    f"mixup: {key!r} has shape {value.shape} but {keys[0]!r} has {count} rows"
                )
        if count % groups:
            raise ValueError(
                f"mixup: the batch of {count} examples does not split into groups={groups} "
                "equal groups; use a batch size divisible by groups"
            )
        weights = draw(rng)
        mixed = dict(batch)
        for key, value in values.items():
            grouped = value.reshape(groups, count // groups, *value.shape[1:])
            w = weights.reshape(groups, size, *[1] * value.ndim)  # [G, size, 1, ...]
            out = w[:, 0] * grouped
            for j in range(1, size):
                out = out + w[:, j] * np.roll(grouped, j, axis=1)
            mixed[key] = out.reshape(value.shape).astype(np.float32)
        return mixed

    return op


def keep(*keys: str):
    """Keeps only the features `keys` (e.g. `keep("image", "labels")`)."""
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"keep: keys={list(keys)!r} must be one or more feature names")

    def op(example, rng):
        missing = [k for k in keys if k not in example]
        if missing:
            raise ValueError(f"keep: the example has no {missing}; keys: {sorted(example)}")
        return {k: example[k] for k in keys}

    return with_vectorized(op, lambda batch, draws: op(batch, None))
