"""Splits held in memory as stacked arrays, so that pipelines can make batches with one gather.

A split qualifies when every feature of its examples is a number or a numeric array of one
shape (encoded image bytes or images of several sizes do not), and, with `cache=None`, when it
takes at most `AUTO_CACHE_BYTES`. Reading it once costs one pass over the split; the arrays are
kept for as long as the source object lives, so pipelines built again over the same split (the
trainer's periodic evaluation) do not read it again.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from vmoe_data.classes import ClassSubset
from vmoe_data.dataset import ArraySource, IndexedSource, Source

AUTO_CACHE_BYTES = 64 * 2**20  # splits up to this size are held in memory by default
_READ_CHUNK = 1024  # examples per batched read

_memo: dict[int, tuple[Any, ArraySource]] = {}  # id(source) -> (weakref to it, its arrays)
_memo_lock = threading.Lock()


def in_memory(source: Source, cache: bool | None) -> ArraySource | None:
    """`source` as stacked arrays, or None where it cannot or should not be held in memory.

    Args:
      source: a split's source.
      cache: True holds any split whose examples stack (an error if they do not); None holds
        those that stack and take at most `AUTO_CACHE_BYTES`; False holds none.
    """
    if cache is False:
        return None
    if isinstance(source, IndexedSource):
        parent = in_memory(source.parent, cache)
        if parent is None:
            return None
        return ArraySource({key: value[source.indices] for key, value in parent.arrays.items()})
    if isinstance(source, ClassSubset):
        parent = in_memory(source.parent, cache)
        if parent is None:
            return None
        arrays = {key: value[source.indices] for key, value in parent.arrays.items()}
        arrays["label"] = source.label_map[arrays["label"]]
        return ArraySource(arrays)
    if isinstance(source, ArraySource):  # in memory already: usable if its arrays are numeric
        return (
            source if all(map(_stackable, source.arrays.values())) else _held(None, source, cache)
        )
    with _memo_lock:
        entry = _memo.get(id(source))
        if entry is not None and entry[0]() is source:
            return entry[1]
    held = _held(_read_all(source, limit=None if cache else AUTO_CACHE_BYTES), source, cache)
    if held is None:
        return None
    key = id(source)
    try:
        reference = weakref.ref(source, lambda _: _forget(key))
    except TypeError:  # not weak-referenceable: hold it for this pipeline only
        return held
    with _memo_lock:
        _memo[key] = (reference, held)
    return held


def _held(arrays: dict | None, source: Source, cache: bool | None) -> ArraySource | None:
    if arrays is not None:
        return ArraySource(arrays)
    if cache:
        raise ValueError(
            f"cache=True, but the examples of {source!r} do not stack into numeric arrays "
            "(every feature must be a number or a numeric array of one shape; encoded image "
            "bytes and images of several sizes are not): use cache=None or False"
        )
    return None


def _forget(key: int) -> None:
    with _memo_lock:
        _memo.pop(key, None)


def _stackable(value: Any) -> bool:
    return (
        isinstance(value, (np.ndarray, np.generic, int, float))
        and np.asarray(value).dtype.kind in "biuf"
    )


def _read_all(source: Source, limit: int | None) -> dict[str, np.ndarray] | None:
    """Every example of `source` stacked per feature, or None if they do not stack or (with a
    `limit`) would take more than `limit` bytes, judged from the first example."""
    size = len(source)
    if size == 0:
        return None
    first = source[0]
    if not isinstance(first, dict) or not first or not all(map(_stackable, first.values())):
        return None
    per_example = sum(np.asarray(value).nbytes for value in first.values())
    if limit is not None and per_example * size > limit:
        return None
    arrays = {
        key: np.empty((size, *np.shape(value)), np.asarray(value).dtype)
        for key, value in first.items()
    }
    read_many = getattr(source, "__getitems__", None)
    for start in range(0, size, _READ_CHUNK):
        indices = range(start, min(start + _READ_CHUNK, size))
        examples = read_many(indices) if read_many else [source[i] for i in indices]
        for offset, example in zip(indices, examples, strict=True):
            if example.keys() != arrays.keys():
                return None
            for key, value in example.items():
                value = np.asarray(value)
                if value.shape != arrays[key].shape[1:] or value.dtype != arrays[key].dtype:
                    return None
                arrays[key][offset] = value
    return arrays
