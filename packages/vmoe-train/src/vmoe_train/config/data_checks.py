"""Validation of the data: the dataset and its splits, the pp specs (run on the first example of
their split) and the batch sizes (split over processes and devices)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vmoe_train.config.checker import MISSING, Checker, error_message, unknown_name
from vmoe_train.config.fields import resolve_pp


@dataclasses.dataclass
class Images:
    """What the pp specs produce on the first example: [H, W] of train and eval images."""

    train: tuple[int, int] | None = None
    eval: tuple[int, int] | None = None


def check_dataset(checker: Checker) -> Any:
    """Checks `dataset.*`; returns the dataset (metadata only) if it opens, else None."""
    import vmoe_data

    splits = checker.get("dataset.eval_splits")
    if splits is not MISSING:
        if not all(isinstance(s, str) and s for s in splits):
            checker.add("dataset.eval_splits", "must be a tuple of split names", splits)
        elif len(set(splits)) != len(splits):
            checker.add("dataset.eval_splits", "names a split twice", splits)
    train_split = checker.get("dataset.train_split")
    if train_split == "":
        checker.add("dataset.train_split", "must be a split name, e.g. 'train'", train_split)
    name = checker.get("dataset.name")
    if name is MISSING:
        return None
    available = vmoe_data.available_datasets()
    family = name.split(":", 1)[0] if ":" in name and name not in available else name
    if family not in available:
        checker.add("dataset.name", unknown_name("dataset", family, available), name)
        return None
    options = {}
    data_dir = checker.get("dataset.data_dir")
    if isinstance(data_dir, str) and data_dir:
        if vmoe_data.DATASETS.accepts(family, "data_dir"):
            options["data_dir"] = data_dir
        else:
            checker.add("dataset.data_dir", f"dataset {family!r} takes no data_dir", data_dir)
    try:
        dataset = vmoe_data.get_dataset(name, **options)
    except Exception as error:  # tfds not prepared, a bad folder, a plugin's own errors
        checker.add("dataset.name", error_message(error), name)
        return None
    classes = checker.get("dataset.classes")
    if classes is not MISSING and classes != ():
        try:
            dataset = vmoe_data.select_classes(dataset, classes)
        except ValueError as error:
            checker.add("dataset.classes", error_message(error), classes)
            return None
    for path, split in _dataset_splits(checker):
        try:
            size = dataset.num_examples(split)
        except ValueError as error:
            checker.add(path, error_message(error), split)
            continue
        if size == 0:
            checker.add(path, f"is empty in dataset {name!r}", split)
    return dataset


def _dataset_splits(checker: Checker) -> list[tuple[str, str]]:
    """(path, split) of every split the config names, skipping mistyped ones."""
    found = []
    train = checker.get("dataset.train_split")
    if isinstance(train, str) and train:
        found.append(("dataset.train_split", train))
    splits = checker.get("dataset.eval_splits")
    if splits is not MISSING:
        found += [(f"dataset.eval_splits[{i}]", s) for i, s in enumerate(splits) if s]
    test = checker.get("dataset.test_split")
    if isinstance(test, str) and test:
        found.append(("dataset.test_split", test))
    return found


def check_pp(checker: Checker, dataset: Any) -> Images:
    """Parses the pp specs and runs them on the first example of their split."""
    import numpy as np

    import vmoe_data

    images = Images()
    valid_splits = {split for path, split in _dataset_splits(checker) if path not in checker.bad}
    eval_splits = [  # pp.eval runs on the eval splits, then on the test split
        split
        for path, split in _dataset_splits(checker)
        if path != "dataset.train_split" and split in valid_splits
    ]
    for path in ("pp.train", "pp.eval"):
        spec = checker.get(path)
        if spec is MISSING:
            continue
        try:  # the device count only fills batch ops' arguments: any count parses the same
            pp = vmoe_data.preprocess(resolve_pp(spec, 1) if isinstance(spec, str) else spec)
        except ValueError as error:
            checker.add(path, error_message(error), spec)
            continue
        if path == "pp.eval" and pp.batch_ops:
            ops = [text for text, _ in pp.batch_ops]
            checker.add(path, f"has batch ops {ops}: they belong in pp.train only", spec)
            continue
        if dataset is None:
            continue
        if path == "pp.train":
            split = checker.get("dataset.train_split")
            split = split if split in valid_splits else None
        else:
            split = eval_splits[0] if eval_splits else None
        if split is None:
            continue
        try:
            example = dataset.source(split)[0]
            out = pp(dict(example), np.random.default_rng(0))
        except Exception as error:
            checker.add(
                path, f"fails on the first example of {split!r}: {error_message(error)}", spec
            )
            continue
        image = out.get("image") if isinstance(out, Mapping) else None
        if np.ndim(image) != 3:
            checker.add(path, "must produce an 'image' [height, width, channels]", spec)
            continue
        hw = tuple(int(n) for n in np.shape(image)[:2])
        wanted = ("labels", "label") if path == "pp.train" else ("label",)
        if not any(key in out for key in wanted):
            checker.add(path, f"must keep {' or '.join(map(repr, wanted))}", spec)
            continue
        labels = out.get("labels")
        if path == "pp.train" and labels is not None:
            depth = np.shape(labels)[-1] if np.ndim(labels) else None
            if depth != dataset.num_classes:
                checker.add(
                    path,
                    f"gives 'labels' of depth {depth}; dataset {dataset.name!r} has "
                    f"{dataset.num_classes} classes (use onehot({dataset.num_classes}))",
                    spec,
                )
        if path == "pp.train":
            images.train = hw
        else:
            images.eval = hw
    if images.train and images.eval and images.train != images.eval:
        checker.add(
            "pp.eval",
            f"makes {hw_text(images.eval)} images but pp.train {hw_text(images.train)}: "
            "the model's position embeddings fit one size",
            checker.get("pp.eval"),
        )
        images.eval = None
    return images


def hw_text(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def check_batches(checker: Checker, processes: int | None, devices: int | None) -> None:
    for path in ("batch_size", "eval_batch_size"):
        size = checker.int_(path, 1)
        if size is MISSING:
            continue
        if processes and size % processes:
            checker.add(
                path,
                f"must be divisible by the {processes} processes (distributed.num_processes)",
                size,
            )
        elif devices and size % devices:
            checker.add(
                path, f"must be divisible by the {devices} devices (it is split over them)", size
            )
        elif path == "batch_size" and size % ((n := microsteps(checker)) * (devices or 1)):
            where = f"{devices} devices x " if devices else ""
            checker.add(
                path,
                f"must be divisible by {where}optimizer.microsteps={n} (each device's batch is "
                f"split into {n} microbatches)",
                size,
            )


def microsteps(checker: Checker) -> int:
    """optimizer.microsteps where it is a valid count (reported by check_optimizer if not)."""
    n = checker.get("optimizer.microsteps")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
