"""Convert an original V-MoE checkpoint, or a dense ViT of google-research/vision_transformer
(a vit_jax .npz file), into a vmoe-train run (`export` goes back to the original format).

    converted = convert("ckpts/vmoe_s32_last2_ilsvrc2012", "runs/s32",
                        config=load_config("vmoe_s32_last2_i1k"))
    run = vmoe_eval.load_run("runs/s32")                        # evaluate it
    # fine-tune it: vmoe-train --config=... --config.finetune.init_from=runs/s32

A converted run is what training writes: `workdir/checkpoints/0/` (an orbax checkpoint: the
parameters, a fresh optimizer state, the config), so every vmoe tool reads it directly. Its config
is the given one (the dataset, preprocessing, optimizer...) with the `model` section taken from
the checkpoint and the release's routing settings (`vmoe_train.original.architecture`), then
the `overrides` on top. The model is read from the arrays' shapes, whatever its size: its sizes
are given field by field (`model.name="V-MoE"`, `model.hidden_size`, ...), so a checkpoint of
no preset's size converts too; a model field the config or the overrides give explicitly and
the checkpoint contradicts is an error (`converted_config`).

Before anything is written, the config is validated and the checkpoint is compared with the
model the config builds: every missing, extra and mis-shaped array is reported at once, by its
original path (`TreeMismatchError`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from vmoe_train import checkpoints, steps
from vmoe_train import config as config_lib
from vmoe_train import setup as setup_lib
from vmoe_train.config.fields import MODEL_SIZE_FIELDS
from vmoe_train.original.architecture import (
    SOURCES,
    Architecture,
    infer_architecture,
    mismatches,
    model_fields,
)
from vmoe_train.original.files import read_checkpoint
from vmoe_train.original.mapping import (
    check_fit,
    flatten,
    original_names,
    params_from_original,
    to_original,
)

PARAMS = "params"


@dataclasses.dataclass(frozen=True)
class Converted:
    """What `convert` wrote.

    Attributes:
      checkpoint: the step directory (`workdir/checkpoints/<step>`).
      config: the run's config (saved with the checkpoint).
      architecture: the model read from the original checkpoint.
      num_arrays: parameter arrays converted.
      skipped: arrays of a full training state that are not parameters (not converted).
    """

    checkpoint: pathlib.Path
    config: ConfigDict
    architecture: Architecture
    num_arrays: int
    skipped: tuple[str, ...]


def _read_arrays(checkpoint: str | os.PathLike) -> tuple[dict[str, Any], tuple[str, ...]]:
    """{original path: array} and the skipped non-parameters of an original checkpoint, or of a
    vit_jax .npz file (a dense ViT: its names are the original's dense parts, renamed)."""
    if str(checkpoint).endswith(".npz"):
        from vmoe_train import vit_jax

        ours = flatten(vit_jax.vit_jax_to_params(vit_jax.load_npz(checkpoint)))
        return {to_original(path): array for path, array in ours.items()}, ()
    return parameters_only(read_checkpoint(checkpoint))


def parameters_only(arrays: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(the parameters, the other paths). The release's checkpoints hold only parameters; a
    training checkpoint of the same code holds `params/...` beside the optimizer state."""
    if not any(path.startswith(f"{PARAMS}/") for path in arrays):
        return dict(arrays), ()
    params = {p[len(PARAMS) + 1 :]: a for p, a in arrays.items() if p.startswith(f"{PARAMS}/")}
    others = tuple(sorted(p for p in arrays if not p.startswith(f"{PARAMS}/")))
    return params, others


def converted_config(
    arch: Architecture, base: ConfigDict, overrides: Sequence[str] = ()
) -> ConfigDict:
    """`base` with the model of `arch` (its sizes field by field: any size converts) and the
    release's MoE settings, then `overrides`.

    Raises:
      ConfigError: model fields given explicitly that the checkpoint contradicts, all at once:
        the size fields `base` sets (> 0), and the model's fields (sizes, classifier,
        representation, experts, MoE blocks: `architecture.SOURCES`) that `overrides` change.
    """
    given = {
        f"model.{f}": base.model[f]
        for f in MODEL_SIZE_FIELDS
        if config_lib.config_get(base, f"model.{f}", 0)
    }
    problems = mismatches(arch, given)
    config = ConfigDict(base.to_dict())
    fields = model_fields(arch)
    moe = fields.pop("moe")
    with config.ignore_type():
        for key, value in fields.items():
            config.model[key] = value
        for key, value in moe.items():
            config.model.moe[key] = ConfigDict(value) if isinstance(value, Mapping) else value
    if overrides:
        before, config = config, config_lib.apply_overrides(config, list(overrides))
        get = config_lib.config_get
        changed = {p: get(config, p) for p in SOURCES if get(config, p) != get(before, p)}
        problems += mismatches(arch, changed)
    if problems:
        raise config_lib.ConfigError(problems)
    return config


def _abstract_params(setup: setup_lib.Setup) -> Any:
    model = steps.init_model(setup.model)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), setup.sample_images))[PARAMS]


def _hints(arch: Architecture, setup: setup_lib.Setup) -> list[str]:
    """Why the usual mismatches happen: the dataset's classes, the images' size."""
    hints = []
    classes = setup.dataset.num_classes
    if arch.num_classes is not None and arch.num_classes != classes:
        hints.append(
            f"the checkpoint's head has {arch.num_classes} classes, dataset "
            f"{setup.config.dataset.name!r} has {classes}: convert with a config of a dataset "
            f"of {arch.num_classes} classes (e.g. --config=vmoe_s32_last2_i1k for ILSVRC2012), "
            "then fine-tune from the converted run with finetune.new_head"
        )
    height, width = np.shape(setup.sample_images)[1:3]
    if arch.image_size is not None and (height, width) != (arch.image_size, arch.image_size):
        hints.append(
            f"the checkpoint's position embeddings fit {arch.image_size}x{arch.image_size} "
            f"images, the config's pp.eval makes {height}x{width}: set pp.eval (and pp.train) to "
            f"that size; fine-tuning resizes them"
        )
    return hints


def convert(
    checkpoint: str | os.PathLike,
    workdir: str | os.PathLike,
    config: ConfigDict | None = None,
    overrides: Sequence[str] = (),
    *,
    step: int = 0,
) -> Converted:
    """Converts the original checkpoint `checkpoint` (its prefix or `.index` file) into the run
    `workdir` (see the module doc). `config` defaults to vmoe-train's default config.

    Raises:
      FileNotFoundError: no such checkpoint, or a data shard it names is missing.
      FormatError: a file is not in the original format (every problem of it at once).
      ConfigError: the resulting config is invalid, or gives the model fields that the
        checkpoint contradicts (every problem at once).
      TreeMismatchError: the arrays do not fit the model (every path at once).
      FileExistsError: `workdir` already holds checkpoints.
    """
    directory = pathlib.Path(workdir) / "checkpoints"
    found = checkpoints.scan(directory)
    if found.complete or found.incomplete:
        raise FileExistsError(
            f"{str(directory)!r} already holds checkpoints; convert into a new workdir"
        )
    arrays, skipped = _read_arrays(checkpoint)
    shapes = {path: tuple(np.shape(a)) for path, a in arrays.items()}
    arch = infer_architecture(shapes)
    base = config if config is not None else config_lib.load_config(config_lib.DEFAULT_CONFIG)
    config = converted_config(arch, base, overrides)
    config_lib.check_config(config, num_devices=jax.device_count())
    setup = setup_lib.build(config)
    abstract = flatten(_abstract_params(setup))
    expected = original_names({path: leaf.shape for path, leaf in abstract.items()})
    check_fit(expected, shapes, hints=_hints(arch, setup))
    params = params_from_original(arrays)
    params = jax.tree.map(
        lambda x, leaf: np.asarray(x, dtype=leaf.dtype), params, _abstract_params(setup)
    )
    _, rng = jax.random.split(jax.random.key(config.seed))
    state = steps.state_from_params(params, setup.optimizer, rng)
    with checkpoints.Checkpointer(directory, every_steps=0, keep=0) as writer:
        path = writer.save(
            step, state, data_state={}, config=config_lib.config_to_json(config), force=True
        )
    assert path is not None  # a new directory: nothing newer, nothing at this step
    return Converted(path, config, arch, len(arrays), skipped)
