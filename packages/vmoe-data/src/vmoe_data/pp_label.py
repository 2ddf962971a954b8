"""Built-in label and structure ops: onehot, mixup (a batch op), keep."""

from __future__ import annotations

import numpy as np

from vmoe_data.preprocess import batch_op, with_vectorized
from vmoe_plugins import check_int, check_number, check_str


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


def mixup(alpha: float = 0.2, keys: tuple[str, ...] | list[str] = ("image", "labels")):
    """Batch op: mixes each example with its neighbour in the batch (np.roll by 1).

    x' = lam * x + (1 - lam) * roll(x, 1), one lam ~ Beta(alpha, alpha) per batch, for every
    key in `keys` (float arrays with a leading batch axis B, e.g. after value_range and
    onehot). Returns float32 arrays.
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

    @batch_op
    def op(batch, rng):
        lam = np.float32(rng.beta(alpha, alpha))
        mixed = dict(batch)
        for key in keys:
            if key not in batch:
                raise ValueError(f"mixup: the batch has no {key!r}; keys: {sorted(batch)}")
            value = np.asarray(batch[key])
            if value.dtype.kind != "f":
                raise ValueError(
                    f"mixup: {key!r} has dtype {value.dtype}; mix float values (apply "
                    "value_range/normalize to images and onehot to labels first)"
                )
            mixed[key] = (lam * value + (1 - lam) * np.roll(value, 1, axis=0)).astype(np.float32)
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
