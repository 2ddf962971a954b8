"""Any prepared tfds dataset, by name: `get_dataset("tfds:cifar10", data_dir=...)`.

Reads the dataset's ArrayRecord files through `builder.as_data_source(split)` (random access,
no TensorFlow needed to read; tfds decodes images with Pillow). Nothing is downloaded here: a
dataset that is not prepared in `data_dir` is an error that says how to prepare it.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from vmoe_data.dataset import Dataset

_LABEL_CHUNK = 4096  # examples read per batched ArrayRecord lookup when gathering labels
_PREPARE_HINT = (
    "prepare it once, with network access, as ArrayRecord files: `tfds build {name} "
    "--data_dir={data_dir} --file_format=array_record` (needs TensorFlow for image datasets), "
    "or `tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record')"
    ".download_and_prepare()`; manual datasets such as imagenet2012 also need the archives in "
    "<data_dir>/downloads/manual"
)


def tfds_dataset(
    tfds_name: str, data_dir: str | os.PathLike | None = None, label_key: str = "label"
) -> Dataset:
    """The tfds dataset `name` (e.g. "cifar10", "imagenet2012:5.1.0") prepared in `data_dir`.

    Args:
      tfds_name: a tfds dataset name, optionally with config and version ("name/config:1.0.0").
      data_dir: where it is prepared; default: tfds's own (`$TFDS_DATA_DIR` or
        `~/tensorflow_datasets`).
      label_key: the feature holding the class label (a `ClassLabel`).
    """
    name = tfds_name
    data_dir = os.fspath(os.path.expanduser(data_dir)) if data_dir else None
    shown_dir = data_dir or tfds.core.constants.DATA_DIR
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"tfds dataset {name!r} is not known to tfds {tfds.__version__} and is not prepared "
            f"in data_dir={shown_dir!r}; check the name (see tfds.list_builders()) or data_dir"
        ) from None
    if not builder.is_prepared():
        root = str(builder.data_dir_root)
        raise ValueError(
            f"tfds dataset {name!r} is not prepared in data_dir={root!r}; "
            + _PREPARE_HINT.format(name=name, data_dir=root)
        )
    info = builder.info
    formats = {f.value for f in info.available_file_formats()}
    if "array_record" not in formats and "parquet" not in formats:
        raise ValueError(
            f"tfds dataset {name!r} in {str(builder.data_dir)!r} is stored as {sorted(formats)}, "
            "which has no random access; prepare it again with file_format='array_record'"
        )
    if label_key not in info.features or not isinstance(
        info.features[label_key], tfds.features.ClassLabel
    ):
        raise ValueError(
            f"tfds dataset {name!r} has no ClassLabel feature {label_key!r}; features: "
            f"{sorted(info.features.keys())}; pass label_key=<the label feature>"
        )
    label_feature = info.features[label_key]
    sources: dict[str, object] = {}

    def open_split(split: str):
        if split not in sources:
            source = builder.as_data_source(split)
            sources[split] = source if label_key == "label" else _RenameLabel(source, label_key)
        return sources[split]

    def read_labels(split: str) -> np.ndarray:
        # Images stay encoded (SkipDecoding): reading labels must not decode every image.
        skip = {
            key: tfds.decode.SkipDecoding()
            for key, feature in info.features.items()
            if isinstance(feature, tfds.features.Image)
        }
        source = builder.as_data_source(split, decoders=skip or None)
        values = np.empty(len(source), dtype=np.int64)
        for start in range(0, len(source), _LABEL_CHUNK):
            indices = range(start, min(start + _LABEL_CHUNK, len(source)))
            values[start : indices.stop] = [e[label_key] for e in source.__getitems__(indices)]
        return values

    return Dataset(
        name=f"tfds:{name}",
        num_classes=label_feature.num_classes,
        split_sizes={split: s.num_examples for split, s in info.splits.items()},
        open_split=open_split,
        class_names=tuple(label_feature.names),
        read_labels=read_labels,
    )


class _RenameLabel:
    """Exposes the feature `label_key` of every example as "label" too."""

    def __init__(self, source, label_key: str) -> None:
        self.source = source
        self.label_key = label_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = dict(self.source[index])
        example["label"] = example[self.label_key]
        return example
