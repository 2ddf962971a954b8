"""A dataset restricted to some of its classes, relabelled 0..n-1 (e.g. digits 0-4 and 5-9).

`select_classes(dataset, (5, 6, 7, 8, 9))` keeps, in every split, the examples of those classes
in their split order, and gives class `classes[i]` the label i, so a model trained on one part
of the classes and one transferred to another both see labels in `[0, n)`. Each split's labels
are read once (the dataset's fast `read_labels` where it has one) when a split is first used.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from vmoe_data.dataset import Dataset, Example, Source, _check_index


class ClassSubset:
    """The examples `parent[indices[i]]` with their label mapped through `label_map`."""

    def __init__(self, parent: Source, indices: np.ndarray, label_map: np.ndarray) -> None:
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self.label_map = np.asarray(label_map, dtype=np.int64)  # old label -> new (-1: dropped)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Example:
        example = dict(self.parent[int(self.indices[_check_index(index, len(self.indices))])])
        example["label"] = self.label_map[int(example["label"])]
        return example

    def __repr__(self) -> str:
        kept = np.flatnonzero(self.label_map >= 0).tolist()
        return f"ClassSubset({self.parent!r}, classes {kept}, {len(self.indices)} examples)"


class _Selection(Mapping[str, int]):
    """Per split, the kept examples' indices and new labels (the parent's labels are read once,
    on first use): also the selected dataset's `split_sizes`, so listing splits reads none."""

    def __init__(self, dataset: Dataset, label_map: np.ndarray) -> None:
        self.dataset = dataset
        self.label_map = label_map
        self._kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # split -> (indices, labels)
        self._lock = threading.Lock()

    def _read(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if split not in self._kept:
                new_labels = self.label_map[self.dataset.labels(split)]
                indices = np.flatnonzero(new_labels >= 0)
                self._kept[split] = (indices, new_labels[indices])
            return self._kept[split]

    def indices(self, split: str) -> np.ndarray:
        return self._read(split)[0]

    def labels(self, split: str) -> np.ndarray:
        return self._read(split)[1].copy()  # a copy: callers may modify what they get

    def open_split(self, split: str) -> ClassSubset:
        return ClassSubset(self.dataset.source(split), self.indices(split), self.label_map)

    def __getitem__(self, split: str) -> int:
        if split not in self.dataset.split_sizes:
            raise KeyError(split)
        return len(self.indices(split))

    def __iter__(self) -> Iterator[str]:
        return iter(self.dataset.split_sizes)

    def __len__(self) -> int:
        return len(self.dataset.split_sizes)


def select_classes(dataset: Dataset, classes: Sequence[int]) -> Dataset:
    """`dataset` with only the examples of `classes`, class `classes[i]` relabelled i.

    Args:
      dataset: any `vmoe_data.Dataset`.
      classes: distinct ints in `[0, dataset.num_classes)`, in the order of their new labels.
    """
    allowed = f"distinct ints in [0, {dataset.num_classes}) (the classes of {dataset.name!r})"
    is_sequence = isinstance(classes, Sequence | np.ndarray) and not isinstance(classes, str)
    values = list(classes) if is_sequence else []
    if not values or not all(_is_int(c) for c in values):
        raise ValueError(f"classes {classes!r} must be a non-empty sequence of {allowed}")
    bad = [int(c) for c in values if not 0 <= c < dataset.num_classes]
    if bad:
        raise ValueError(
            f"classes {bad} are outside [0, {dataset.num_classes}); allowed: {allowed}"
        )
    repeated = sorted({int(c) for c in values if values.count(c) > 1})
    if repeated:
        raise ValueError(f"classes {repeated} are named twice; allowed: {allowed}")
    label_map = np.full(dataset.num_classes, -1, dtype=np.int64)
    label_map[np.asarray(values, dtype=np.int64)] = np.arange(len(values))
    selection = _Selection(dataset, label_map)
    names = dataset.class_names
    return Dataset(
        name=f"{dataset.name}[classes {','.join(str(int(c)) for c in values)}]",
        num_classes=len(values),
        split_sizes=selection,
        open_split=selection.open_split,
        class_names=tuple(names[int(c)] for c in values) if names else (),
        read_labels=selection.labels,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
