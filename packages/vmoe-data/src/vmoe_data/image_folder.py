"""Users' own images: one sub-folder per class, `get_dataset("image_folder:/path/to/images")`.

Two layouts, told apart by what the folder holds:

    root/<class>/<image>            one split, "train"
    root/<split>/<class>/<image>    one split per sub-folder (e.g. train/, validation/, test/)

Classes are the class folder names, sorted, with labels 0, 1, ... in that order (the same
across splits). Image files are found by extension (case-insensitive) and listed in sorted
order. Examples are `{"image": <the file's encoded bytes>, "label": int64, "path": str}`:
start the pp spec with `decode` to get `[H, W, C]` uint8 pixels.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from vmoe_data.dataset import Dataset

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


class FileSource:
    """Random access to image files with labels: `source[i] -> {"image": bytes, ...}`."""

    def __init__(self, paths: Sequence[pathlib.Path], labels: Sequence[int]) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        with open(path, "rb") as f:
            data = f.read()
        return {"image": data, "label": self.labels[index], "path": path}


def image_folder(path: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Dataset:
    """A dataset of the images under `path` (see the module docstring for the layouts)."""
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    extensions = tuple(e.lower() for e in extensions)
    children = _subdirs(root)
    if not children:
        raise ValueError(
            f"image folder {str(root)!r} has no sub-folders; expected one folder per class "
            "(root/<class>/<image>) or per split (root/<split>/<class>/<image>)"
        )
    if any(_images(child, extensions) for child in children):
        split_dirs = {"train": root}  # root/<class>/<image>
    else:
        split_dirs = {child.name: child for child in children}
    classes = sorted({c.name for d in split_dirs.values() for c in _subdirs(d)})
    label_of = {name: label for label, name in enumerate(classes)}
    files: dict[str, tuple[list[pathlib.Path], list[int]]] = {}
    for split, split_dir in split_dirs.items():
        paths, labels = [], []
        for class_dir in _subdirs(split_dir):
            found = _images(class_dir, extensions)
            paths += found
            labels += [label_of[class_dir.name]] * len(found)
        if paths:
            files[split] = (paths, labels)
    if not files:
        raise ValueError(
            f"image folder {str(root)!r} holds no images with extensions {list(extensions)} "
            "in its class folders"
        )
    return Dataset(
        name=f"image_folder:{root}",
        num_classes=len(classes),
        split_sizes={split: len(paths) for split, (paths, _) in files.items()},
        open_split=lambda split: FileSource(*files[split]),
        class_names=tuple(classes),
        read_labels=lambda split: np.asarray(files[split][1], dtype=np.int64),
    )


def _subdirs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: pathlib.Path, extensions: tuple[str, ...]) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
