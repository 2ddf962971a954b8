"""`Dataset`: named splits of labelled examples, each split a random-access source.

A source is anything with `len(source)` and `source[i] -> example`, where an example is a dict
of numpy values; image datasets hold at least `"image"` (`[H, W, C]` uint8, or encoded bytes
that the `decode` op turns into that) and `"label"` (an int in `[0, num_classes)`). tfds
ArrayRecord data sources, `ArraySource` and the image-folder source all qualify, and grain reads
any of them by index (so shuffling, sharding and resuming never scan the data).

Split names may carry a slice: `"train[:100]"`, `"train[10%:20%]"`, `"test[-50:]"`. Percentages
round to the nearest example; the slice applies to the split's fixed order.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

Example = dict[str, Any]


@runtime_checkable
class Source(Protocol):
    """Random access to the examples of one split."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


class ArraySource:
    """A source over in-memory arrays: `{"image": [N, H, W, C], "label": [N], ...}`.

    Every value must have the same leading length N; `source[i]` is `{key: value[i]}`.
    """

    def __init__(self, arrays: Mapping[str, Any]) -> None:
        if not arrays:
            raise ValueError("ArraySource needs at least one array; got an empty mapping")
        self.arrays = {key: np.asarray(value) for key, value in arrays.items()}
        lengths = {key: len(value) for key, value in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"ArraySource arrays differ in length: {lengths}; they must agree")
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Example:
        index = _check_index(index, self._length)
        return {key: value[index] for key, value in self.arrays.items()}

    def __repr__(self) -> str:
        shapes = {key: value.shape for key, value in self.arrays.items()}
        return f"ArraySource({shapes})"


class IndexedSource:
    """The examples `parent[indices[0]], parent[indices[1]], ...` (a slice or subset)."""

    def __init__(self, parent: Source, indices: Sequence[int] | np.ndarray) -> None:
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Example:
        return self.parent[int(self.indices[_check_index(index, len(self.indices))])]

    def __repr__(self) -> str:
        return f"IndexedSource({self.parent!r}, {len(self.indices)} examples)"


def _check_index(index: int, length: int) -> int:
    index = int(index)
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for a source of {length} examples")
    return index % length


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset: its splits (name -> number of examples) and how to open each one.

    Attributes:
      name: the name it was created under (e.g. "digits", "tfds:cifar10").
      num_classes: labels are ints in `[0, num_classes)`.
      split_sizes: split name -> number of examples.
      open_split: `open_split(split) -> Source` for a plain split name (no slice).
      class_names: one name per label, if known.
      read_labels: optional fast `read_labels(split) -> int array [N]` that skips the images.
    """

    name: str
    num_classes: int
    split_sizes: Mapping[str, int]
    open_split: Callable[[str], Source] = dataclasses.field(repr=False)
    class_names: tuple[str, ...] = ()
    read_labels: Callable[[str], np.ndarray] | None = dataclasses.field(default=None, repr=False)

    @property
    def splits(self) -> list[str]:
        """The split names, sorted."""
        return sorted(self.split_sizes)

    def source(self, split: str = "train") -> Source:
        """Random access to `split` (optionally sliced, e.g. `"train[:80%]"`)."""
        base, bounds = parse_split(split)
        if base not in self.split_sizes:
            raise ValueError(
                f"unknown split {base!r} of dataset {self.name!r}; splits: {self.splits}"
            )
        source = self.open_split(base)
        if bounds is None:
            return source
        start, stop = _resolve_bounds(split, bounds, len(source))
        return IndexedSource(source, np.arange(start, stop))

    def num_examples(self, split: str = "train") -> int:
        """The number of examples in `split` (slices included)."""
        base, bounds = parse_split(split)
        if base in self.split_sizes and bounds is None:
            return int(self.split_sizes[base])
        return len(self.source(split))

    def labels(self, split: str = "train") -> np.ndarray:
        """The label of every example of `split`, in source order: int64 `[N]`."""
        base, bounds = parse_split(split)
        if self.read_labels is not None and base in self.split_sizes:
            labels = np.asarray(self.read_labels(base), dtype=np.int64)
            if bounds is not None:
                labels = labels[slice(*_resolve_bounds(split, bounds, len(labels)))]
            return labels
        source = self.source(split)
        return np.array([int(source[i]["label"]) for i in range(len(source))], dtype=np.int64)


_SPLIT = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?:\[(.*)\])?\s*$")
_BOUND = re.compile(r"^\s*(-?\d+)\s*(%?)\s*$")


def parse_split(split: str) -> tuple[str, tuple[str, str] | None]:
    """`"train[10%:50%]"` -> `("train", ("10%", "50%"))`; `"test"` -> `("test", None)`."""
    match = _SPLIT.match(split) if isinstance(split, str) else None
    if match is None or (match.group(2) is not None and match.group(2).count(":") != 1):
        raise ValueError(
            f"bad split {split!r}; expected a name with an optional slice, "
            "e.g. 'train', 'train[:1000]', 'train[10%:]'"
        )
    if match.group(2) is None:
        return match.group(1), None
    start, stop = match.group(2).split(":")
    return match.group(1), (start, stop)


def _resolve_bounds(split: str, bounds: tuple[str, str], length: int) -> tuple[int, int]:
    resolved = []
    for text, default in zip(bounds, (0, length), strict=True):
        if not text.strip():
            resolved.append(default)
            continue
        match = _BOUND.match(text)
        if match is None:
            raise ValueError(
                f"bad slice bound {text!r} in split {split!r}; use integers or percentages"
            )
        value = int(match.group(1))
        if match.group(2):
            value = round(value * length / 100)
        resolved.append(min(max(value + length if value < 0 else value, 0), length))
    start, stop = resolved
    if stop <= start:
        raise ValueError(f"split {split!r} selects no examples out of {length}")
    return start, stop
