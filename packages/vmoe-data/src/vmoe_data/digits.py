"""The embedded dataset: scikit-learn's 1,797 real 8x8 handwritten digits, as a tfds dataset.

scikit-learn ships the digits (`sklearn.datasets.load_digits`, from the UCI optdigits test set),
so this dataset needs no network. On first use a `tfds.core.GeneratorBasedBuilder` writes them as
ArrayRecord files into the data dir (`data_dir=`, else `$VMOE_DATA_DIR`, else
`~/.cache/vmoe/tensorflow_datasets`); later uses read those files through
`builder.as_data_source(split)`, the same path as any prepared tfds dataset. The first build
prints nothing (it takes about a second): tfds's output while building goes nowhere, and so does
its expected warning that the not-yet-built dataset "has no dataset_info.json"; any other warning
or error still shows.

Features of every example:
  image: uint8 `[8, 8, 1]`; pixel = round(sklearn value (0..16) * 255 / 16), so 0..255.
  label: int64 digit 0..9.
  id:    int64 index of the image in `load_digits()` (0..1796).

Splits are fixed and stratified: within each digit, in `load_digits()` order, the examples whose
rank r has r % 10 in {0, 5} go to "test", r % 10 == 3 to "validation", the rest to "train"
(1,253 train / 180 validation / 364 test). Each split's order is tfds's fixed shuffled order.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants, registered

from vmoe_data.dataset import Dataset

DATA_DIR_ENV = "VMOE_DATA_DIR"
NUM_CLASSES = 10
SPLIT_OF_RANK = {0: "test", 5: "test", 3: "validation"}  # rank % 10 -> split; others: train


def default_data_dir() -> pathlib.Path:
    """Where built datasets live: `$VMOE_DATA_DIR`, else `~/.cache/vmoe/tensorflow_datasets`."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "vmoe" / "tensorflow_datasets"


def split_ids() -> dict[str, np.ndarray]:
    """Split name -> sorted `load_digits()` indices in that split (the fixed stratified rule)."""
    targets = _load_digits().target
    assignment = np.empty(len(targets), dtype=object)
    for digit in range(NUM_CLASSES):
        (members,) = np.nonzero(targets == digit)
        for rank, index in enumerate(members):
            assignment[index] = SPLIT_OF_RANK.get(rank % 10, "train")
    return {split: np.flatnonzero(assignment == split) for split in ("train", "validation", "test")}


def sklearn_images_uint8() -> np.ndarray:
    """All 1,797 sklearn digit images as stored here: uint8 `[1797, 8, 8, 1]`."""
    images = _load_digits().images  # float64 [1797, 8, 8], values 0..16
    return np.round(images * 255.0 / 16.0).astype(np.uint8)[..., None]


@functools.cache
def _load_digits():
    from sklearn.datasets import load_digits  # imported on first build only (slow import)

    return load_digits()


with registered.skip_registration():  # keep tfds's global registry free of our builder

    class VmoeDigits(tfds.core.GeneratorBasedBuilder):
        """tfds builder of the embedded digits (no download: the data ships with sklearn)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES: ClassVar[dict[str, str]] = {
            "1.0.0": "sklearn load_digits, stratified 70/10/20 splits."
        }
        # No checksums or metadata files beside the code: tfds's search for them needs the
        # `importlib_resources` backport for modules inside packages, which tfds does not declare.
        code_path = None

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(
                            names=[str(d) for d in range(NUM_CLASSES)]
                        ),
                        "id": tfds.features.Scalar(dtype=np.int64),
                    }
                ),
                supervised_keys=("image", "label"),
                homepage="https://archive.ics.uci.edu/dataset/80",
                citation="Alpaydin, E. and Kaynak, C. (1998). Optical Recognition of "
                "Handwritten Digits. UCI Machine Learning Repository.",
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            return {split: self._generate_examples(ids) for split, ids in split_ids().items()}

        def _generate_examples(self, ids):
            images = sklearn_images_uint8()
            targets = _load_digits().target
            for index in ids:
                yield (
                    int(index),
                    {
                        "image": images[index],
                        "label": int(targets[index]),
                        "id": int(index),
                    },
                )


def digits_builder(data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """The digits builder over `data_dir`, built into ArrayRecord files if not there yet."""
    root = pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir()
    builder = VmoeDigits(data_dir=str(root), file_format="array_record")
    with _quiet_not_prepared_warning(builder.data_path):
        if builder.is_prepared():
            return builder
        root.mkdir(parents=True, exist_ok=True)
        with _exclusive(root / "vmoe_digits.lock"), _quiet_tfds():
            builder = VmoeDigits(data_dir=str(root), file_format="array_record")
            if not builder.is_prepared():  # another process may have built it meanwhile
                builder.download_and_prepare()
    return builder


def digits(data_dir: str | None = None) -> Dataset:
    """The embedded digits dataset (built on first use; see the module docstring)."""
    builder = digits_builder(data_dir)
    split_sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
    sources: dict[str, object] = {}

    def open_split(split: str):
        if split not in sources:
            sources[split] = builder.as_data_source(split)
        return sources[split]

    return Dataset(
        name="digits",
        num_classes=NUM_CLASSES,
        split_sizes=split_sizes,
        open_split=open_split,
        class_names=tuple(builder.info.features["label"].names),
    )


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive file lock, so concurrent processes build the dataset once."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """No tfds output while building (a few milliseconds of work): its progress bars (stderr)
    and its "Downloading and preparing dataset Unknown size..." line (stdout, misleading
    offline) go nowhere. Errors still raise; no tfds setting is changed."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _quiet_not_prepared_warning(variant_dir: str | os.PathLike) -> Iterator[None]:
    """Drops tfds's "Variant folder <variant_dir> has no dataset_info.json" absl warning while
    inside: `builder.is_prepared()` logs it whenever the dataset is not built yet, which on first
    use is expected, not an error. Only that message about that folder is dropped (a filter on
    the "absl" logger, which tfds logs through); it is removed on exit, so logging is as before."""
    expected = f"Variant folder {variant_dir} has no {constants.DATASET_INFO_FILENAME}"

    def keep(record: logging.LogRecord) -> bool:
        try:
            return record.getMessage() != expected
        except Exception:  # a malformed record: let the handlers report it, as without us
            return True

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(keep)
    try:
        yield
    finally:
        absl_logger.removeFilter(keep)
