"""The dataset and preprocessing-op registries (built-ins plus installed plugins).

Importing this module adds vmoe-data's hookspecs and built-in plugin to the shared vmoe plugin
manager (`vmoe_plugins`), so both registries see built-ins and plugins alike.
"""

from __future__ import annotations

import inspect
from typing import Any

import vmoe_plugins as plugins
from vmoe_data import _builtins, hookspecs
from vmoe_data.dataset import Dataset

plugins.add_hookspecs(hookspecs)
plugins.register_builtin("vmoe_data.builtins", _builtins)

DATASETS: plugins.Registry[Dataset] = plugins.Registry("vmoe_datasets", "dataset")
PP_OPS: plugins.Registry[Any] = plugins.Registry("vmoe_preprocess_ops", "preprocess op")

DEFAULT_DATASET = "digits"


def get_dataset(name: str = DEFAULT_DATASET, **options: Any) -> Dataset:
    """The dataset registered as `name`, built with `options`.

    `"name:argument"` passes the argument as the factory's first parameter:
    `get_dataset("tfds:cifar10")` is `get_dataset("tfds", tfds_name="cifar10")` and
    `get_dataset("image_folder:/data/pets")` is `get_dataset("image_folder", path="/data/pets")`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name {name!r} must be a non-empty string")
    if ":" in name and name not in DATASETS.names():
        family, argument = name.split(":", 1)
        parameters = list(inspect.signature(DATASETS.factory(family)).parameters)
        if not parameters:
            raise ValueError(f"dataset {family!r} takes no argument; use {family!r} alone")
        if not argument:
            raise ValueError(
                f"dataset name {name!r} has nothing after ':'; give the {parameters[0]}, "
                f"e.g. '{family}:<{parameters[0]}>'"
            )
        if parameters[0] in options:
            raise ValueError(
                f"dataset {name!r} names its {parameters[0]} twice: after ':' and as "
                f"{parameters[0]}={options[parameters[0]]!r}"
            )
        family_name, dataset = (
            family,
            DATASETS.create(family, **{parameters[0]: argument}, **options),
        )
    else:
        family_name, dataset = name, DATASETS.create(name, **options)
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"dataset {family_name!r} (from {DATASETS.provider(family_name)}) returned a "
            f"{type(dataset).__name__}, not a vmoe_data.Dataset"
        )
    return dataset


def available_datasets() -> list[str]:
    """Names of every installed dataset (built-ins and plugins), sorted."""
    return DATASETS.names()


def available_preprocess_ops() -> list[str]:
    """Names of every installed preprocessing op (built-ins and plugins), sorted."""
    return PP_OPS.names()
