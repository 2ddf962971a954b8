"""A synthetic dataset of random images, generated per index: for benchmarks and smoke tests.

`get_dataset("synthetic", image_size=224, num_classes=1000)`: example i of a split is the same
on every call and every process (its pixels come from a generator seeded with (seed, split, i)),
so pipelines over it are as deterministic as over real data. Nothing is stored.
"""

from __future__ import annotations

import zlib

import numpy as np

from vmoe_data.dataset import Dataset
from vmoe_plugins import check_int


class SyntheticSource:
    """`source[i] -> {"image": uint8 [H, W, C], "label": int64}`, pixels uniform in 0..255."""

    def __init__(
        self,
        num_examples: int,
        image_shape: tuple[int, int, int],
        num_classes: int,
        seed: tuple[int, ...],
    ) -> None:
        self.num_examples = num_examples
        self.image_shape = image_shape
        self.num_classes = num_classes
        self.seed = seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([*self.seed, index])
        image = rng.integers(0, 256, size=self.image_shape, dtype=np.uint8)
        return {"image": image, "label": np.int64(index % self.num_classes)}


def synthetic(
    image_size: int = 224,
    channels: int = 3,
    num_classes: int = 1000,
    num_train: int = 10_000,
    num_test: int = 1_000,
    seed: int = 0,
) -> Dataset:
    """Random `[image_size, image_size, channels]` uint8 images; label i % num_classes."""
    image_size, channels, num_classes, num_train, num_test = (
        check_int(name, value, 1, where="synthetic dataset: ")
        for name, value in [
            ("image_size", image_size),
            ("channels", channels),
            ("num_classes", num_classes),
            ("num_train", num_train),
            ("num_test", num_test),
        ]
    )
    seed = check_int("seed", seed, 0, where="synthetic dataset: ")
    sizes = {"train": num_train, "test": num_test}
    shape = (image_size, image_size, channels)

    def open_split(split: str) -> SyntheticSource:
        return SyntheticSource(sizes[split], shape, num_classes, (seed, zlib.crc32(split.encode())))

    return Dataset(
        name="synthetic",
        num_classes=num_classes,
        split_sizes=sizes,
        open_split=open_split,
        read_labels=lambda split: np.arange(sizes[split], dtype=np.int64) % num_classes,
    )
