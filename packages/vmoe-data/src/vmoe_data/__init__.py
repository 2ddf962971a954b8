"""vmoe-data: input pipelines for vmoe.

grain pipelines over random-access sources (tfds ArrayRecord datasets, image folders, the
embedded digits), preprocessing ops chained from spec strings, and plugin registries for both.

    import vmoe_data
    train = vmoe_data.train_pipeline(
        "digits", batch_size=64, pp="decode|value_range(-1, 1)|onehot(10)", seed=0
    )
    it = iter(train)
    batch = next(it)              # {"image": float32 [64, 8, 8, 1], "labels": [64, 10], ...}
    state = it.get_state()        # resume later with it.set_state(state)

Shapes: B global batch, P processes, L = B / P local batch, H x W x C images.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_data.classes import ClassSubset, select_classes
from vmoe_data.dataset import ArraySource, Dataset, IndexedSource, Source, parse_split
from vmoe_data.digits import DATA_DIR_ENV, default_data_dir
from vmoe_data.draws import Draws
from vmoe_data.few_shot import few_shot_indices
from vmoe_data.pipelines import (
    eval_pipeline,
    few_shot_pipeline,
    local_batch_size,
    resolve_processes,
    train_pipeline,
)
from vmoe_data.preprocess import Preprocess, batch_op, preprocess, with_vectorized
from vmoe_data.registry import (
    DATASETS,
    DEFAULT_DATASET,
    PP_OPS,
    available_datasets,
    available_preprocess_ops,
    get_dataset,
)

__version__ = importlib.metadata.version("vmoe-data")

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_DATASET",
    "PP_OPS",
    "ArraySource",
    "ClassSubset",
    "Dataset",
    "Draws",
    "IndexedSource",
    "Preprocess",
    "Source",
    "__version__",
    "available_datasets",
    "available_preprocess_ops",
    "batch_op",
    "default_data_dir",
    "eval_pipeline",
    "few_shot_indices",
    "few_shot_pipeline",
    "get_dataset",
    "local_batch_size",
    "parse_split",
    "preprocess",
    "resolve_processes",
    "select_classes",
    "train_pipeline",
    "with_vectorized",
]
