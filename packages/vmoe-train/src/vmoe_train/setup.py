"""The parts of a run, built from its config: dataset, model, sharding strategy, optimizer, steps.

    setup = build(config)        # Setup: nothing is computed on devices yet
    setup.train_step(state, setup.to_global(batch))

The builders stand alone too: `open_dataset(config)` (the dataset, restricted to
`dataset.classes`), `data_cache(config)` (the pipelines' `cache`), `build_model(config, ...)`
(the uninitialised model), `tokens_per_image(model, image_hwc)` and `routing_group_size(config,
...)` (the tokens of a routing group), `eval_capacity_factor(config)` (the routers' capacity
at evaluation). The trainer (`trainer.train`), the evaluators (vmoe-eval) and the benchmarks
build their runs with these, so they all see the same model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import vmoe_data
import vmoe_layers as vl
from vmoe_train import optim, steps
from vmoe_train.config import DATA_CACHE, config_get
from vmoe_train.config.overrides import deep_tuple
from vmoe_train.state import TrainState

__all__ = [
    "Setup",
    "build",
    "build_model",
    "data_cache",
    "eval_capacity_factor",
    "open_dataset",
    "routing_group_size",
    "tokens_per_image",
]


@dataclasses.dataclass
class Setup:
    """The parts of a run, built from its config (see `build`)."""

    config: Any
    dataset: vmoe_data.Dataset
    strategy: Any
    model: vl.VisionTransformer
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[Any, dict], dict]
    sample_images: np.ndarray

    def to_global(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's batch [L, ...] -> global arrays [B, ...] split by the strategy.

        Only numeric features travel (file names and other strings stay on the host)."""
        spec = self.strategy.batch_spec()
        sharding = NamedSharding(self.strategy.mesh, PartitionSpec(*spec))
        arrays = {key: np.asarray(value) for key, value in local_batch.items()}
        return {
            key: jax.make_array_from_process_local_data(sharding, value)
            for key, value in arrays.items()
            if value.dtype.kind in "biuf"
        }

    def eval_batches(self, split: str):
        cfg = self.config
        return vmoe_data.eval_pipeline(
            self.dataset,
            split=split,
            batch_size=cfg.eval_batch_size,
            pp=cfg.pp.eval,
            cache=data_cache(cfg),
        )


def build(config: Any) -> Setup:
    """Every part of the run from the config (nothing is computed on devices yet)."""
    dataset = open_dataset(config)
    strategy_options = {}
    if config.sharding.mesh_shape:
        strategy_options["mesh_shape"] = tuple(config.sharding.mesh_shape)
    strategy = vl.get_strategy(config.sharding.strategy, **strategy_options)
    # One preprocessed example gives the image shape the model sees.
    first = next(
        iter(
            vmoe_data.eval_pipeline(
                dataset,
                split=config.dataset.train_split,
                batch_size=1,
                pp=config.pp.eval,
                process_index=0,
                process_count=1,
            )
        )
    )
    sample = np.asarray(first["image"])
    plain = build_model(config, num_classes=dataset.num_classes)  # to count tokens
    # Routing groups are made within each microbatch (configs saved before the field: 1).
    microsteps = int(config_get(config, "optimizer.microsteps", 1))
    group_size = routing_group_size(
        config,
        per_device_batch=config.batch_size // jax.device_count() // microsteps,
        tokens_per_image=tokens_per_image(plain, sample.shape[1:]),
    )
    model = build_model(
        config,
        num_classes=dataset.num_classes,
        group_size=group_size if plain.moe is not None else None,
        exchange=strategy.exchange,
    )
    schedule = optim.make_schedule(config.optimizer, config.num_steps)
    init_model = steps.init_model(model)
    abstract_params = jax.eval_shape(lambda: init_model.init(jax.random.key(0), sample)["params"])
    optimizer = optim.make_optimizer(config.optimizer, config.num_steps, abstract_params)
    train_step = jax.jit(
        steps.make_train_step(
            model,
            optimizer,
            loss_kind=config.loss.kind,
            label_smoothing=float(config.loss.label_smoothing),
            trainable=optim.trainable_mask(config.optimizer, abstract_params),
            microsteps=microsteps,
        ),
        donate_argnums=0,
    )
    capacity = eval_capacity_factor(config)
    eval_step = jax.jit(
        steps.make_eval_step(model, loss_kind=config.loss.kind, capacity_factor=capacity)
    )
    return Setup(
        config, dataset, strategy, model, optimizer, schedule, train_step, eval_step, sample
    )


# ---------------------------------------------------------------------------------------------
# The data


def open_dataset(config: Any) -> Any:
    """The config's `vmoe_data.Dataset`: `dataset.name` (with `dataset.data_dir`), restricted to
    `dataset.classes` (relabelled 0..n-1) where that is set."""
    data_dir = {"data_dir": config.dataset.data_dir} if config.dataset.data_dir else {}
    dataset = vmoe_data.get_dataset(config.dataset.name, **data_dir)
    classes = tuple(config_get(config, "dataset.classes", ()) or ())
    return vmoe_data.select_classes(dataset, classes) if classes else dataset


def data_cache(config: Any) -> bool | None:
    """The vmoe_data pipelines' `cache` argument for `config.dataset.cache` ("auto" where a
    config saved before the field existed has none)."""
    return DATA_CACHE[config_get(config, "dataset.cache", "auto")]


# ---------------------------------------------------------------------------------------------
# The model and its routing groups


def build_model(
    config: Any,
    *,
    num_classes: int | None,
    group_size: int | None = None,
    exchange: Any = None,
) -> Any:
    """The (uninitialised) `vmoe_layers.VisionTransformer` that `config.model` describes.

    `model.name` is the preset; `model.mlp_dim` (if > 0), `model.dropout_rate`, `model.dtype`,
    `model.classifier` and `model.representation_size` (if > 0) replace its values; a V-MoE
    takes `model.moe` (experts, layers, router and its options, expert type, dispatch dtype).
    `group_size` is the tokens per routing group (see `routing_group_size`; None: one image),
    `exchange` the sharding strategy's.
    """
    import jax.numpy as jnp

    model_config = config.model
    moe_options = {}
    if str(model_config.name).startswith("V-MoE-"):
        moe = model_config.moe
        moe_options = {
            "num_experts": moe.num_experts,
            "moe_layers": deep_tuple(moe.layers),
            "router": moe.router,
            "router_options": moe.router_options.to_dict(),
            "group_size": group_size,
        }
    # Fields newer than some saved configs: read with their defaults.
    representation_size = int(config_get(model_config, "representation_size", 0))
    model = vl.create_model(
        model_config.name,
        num_classes=num_classes,
        dropout_rate=float(model_config.dropout_rate),
        dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_config.dtype],
        classifier=config_get(model_config, "classifier", "token"),
        representation_size=representation_size or None,
        exchange=exchange,
        **moe_options,
    )
    updates: dict[str, Any] = {}
    if model_config.mlp_dim:
        updates["mlp_dim"] = int(model_config.mlp_dim)
    if model.moe is not None:
        updates["moe"] = dataclasses.replace(
            model.moe,
            expert_type=model_config.moe.expert_type,
            dispatch_dtype=config_get(model_config, "moe.dispatch_dtype", "") or None,
        )
    return model.clone(**updates) if updates else model


def tokens_per_image(model: vl.VisionTransformer, image_hwc: tuple[int, ...]) -> int:
    """Patches of one image, plus the class token if the model has one."""
    h, w = image_hwc[0] // model.patch_size, image_hwc[1] // model.patch_size
    return h * w + (1 if model.classifier == "token" else 0)


def routing_group_size(config: Any, *, per_device_batch: int, tokens_per_image: int) -> int:
    """Tokens per routing group: `model.moe.group_images` images (0: the per-device batch)."""
    images = config.model.moe.group_images or per_device_batch
    return images * tokens_per_image


def eval_capacity_factor(config: Any) -> float | None:
    """The routers' capacity factor at evaluation: `eval.capacity_factor`, or None (the routers'
    own) where it is 0 or a config saved before the field existed has none."""
    return float(config_get(config, "eval.capacity_factor", 0.0) or 0.0) or None
