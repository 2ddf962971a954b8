"""Users' own images: one sub-folder per class, `get_dataset("image_folder:/path/to/images")`.

Two layouts, told apart by what the folder holds:

    root/<class>/<image>            one split, "train"
    root/<split>/<class>/<image>    one split per sub-folder (e.g. train/, validation/, test/)

Classes are the class folder names, sorted, with labels 0, 1, ... in that order (the same
across splits). Image files are found by extension (case-insensitive) and listed in sorted
order. Examples are `{"image": <the file's encoded bytes>, "label": int64, "path": str}`:
start the pp spec with `decode` to get `[H, W, C]` uint8 pixels.

Layouts that are probably mistakes are errors, not guesses: a class folder without images
(e.g. images nested one level deeper, root/cat/2020/*.jpg), class folders named like splits
(root/train/*.png), a split sharing no class with the other splits, and fewer than 2 classes.
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
    holding = [child for child in children if _images(child, extensions)]
    if holding:  # root/<class>/<image>
        _check_class_folders(root, children, extensions)
        if all(child.name.lower() in _SPLIT_NAMES for child in children):
            raise ValueError(
                f"image folder {str(root)!r}: the folders {[c.name for c in children]} look like "
                "splits but hold images directly; put the images in <split>/<class>/ folders"
            )
        split_dirs = {"train": root}
    else:  # root/<split>/<class>/<image>
        split_dirs = {child.name: child for child in children}
        class_sets = {}
        for split, split_dir in split_dirs.items():
            class_dirs = _subdirs(split_dir)
            if not class_dirs:
                raise ValueError(
                    f"image folder {str(root)!r}: {split!r} holds neither images (extensions "
                    f"{list(extensions)}) nor class folders"
                )
            _check_class_folders(root, class_dirs, extensions)
            class_sets[split] = sorted(c.name for c in class_dirs)
        for split, names in class_sets.items():
            others = {n for s, ns in class_sets.items() if s != split for n in ns}
            if others and not others & set(names):
                raise ValueError(
                    f"image folder {str(root)!r}: read as root/<split>/<class>/<image>, split "
                    f"{split!r} shares no class with the other splits: {class_sets}; are the "
                    "class folders nested one level too deep?"
                )
    classes = sorted({c.name for d in split_dirs.values() for c in _subdirs(d)})
    if len(classes) < 2:
        raise ValueError(
            f"image folder {str(root)!r} has one class, {classes[0]!r}, with splits "
            f"{sorted(split_dirs)}; expected root/<class>/<image> or root/<split>/<class>/<image> "
            "with at least 2 classes"
        )
    label_of = {name: label for label, name in enumerate(classes)}
    files: dict[str, tuple[list[pathlib.Path], list[int]]] = {}
    for split, split_dir in split_dirs.items():
        paths, labels = [], []
        for class_dir in _subdirs(split_dir):
            found = _images(class_dir, extensions)
            paths += found
            labels += [label_of[class_dir.name]] * len(found)
        files[split] = (paths, labels)
    return Dataset(
        name=f"image_folder:{root}",
        num_classes=len(classes),
        split_sizes={split: len(paths) for split, (paths, _) in files.items()},
        open_split=lambda split: FileSource(*files[split]),
        class_names=tuple(classes),
        read_labels=lambda split: np.asarray(files[split][1], dtype=np.int64),
    )


_SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "eval"}


def _check_class_folders(
    root: pathlib.Path, class_dirs: list[pathlib.Path], extensions: tuple[str, ...]
) -> None:
    """Every class folder must hold images directly (no class left empty, none nested deeper)."""
    empty = [c for c in class_dirs if not _images(c, extensions)]
    if empty:
        shown = [str(c.relative_to(root)) for c in empty]
        nested = [str(s.relative_to(root)) for c in empty for s in _subdirs(c)][:5]
        raise ValueError(
            f"image folder {str(root)!r}: the class folders {shown} hold no images with "
            f"extensions {list(extensions)}"
            + (
                f" (only sub-folders {nested}; images must sit directly in the class folder)"
                if nested
                else ""
            )
        )


def _subdirs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: pathlib.Path, extensions: tuple[str, ...]) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
