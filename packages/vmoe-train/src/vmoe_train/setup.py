"""The parts of a run, built from its config: dataset, model, sharding strategy, optimizer, steps.

    setup = build(config)        # Setup: nothing is computed on devices yet
    setup.train_step(state, setup.to_global(batch))

The builders stand alone too: `open_dataset(config)` (the dataset, restricted to
`dataset.classes`), `data_cache(config)` (the pipelines' `cache`), `build_model(config, ...)`
(the uninitialised model; `model_sizes(config.model)` its sizes), `tokens_per_image(model,
image_hwc)` and `routing_group_size(config, ...)` (the tokens of a routing group),
`eval_capacity_factor(config)` (the routers' capacity at evaluation). The trainer
(`trainer.train`), the evaluators (vmoe-eval) and the benchmarks build their runs with these, so
they all see the same model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import vmoe_data
import vmoe_layers as vl
from vmoe_train import optim, steps
from vmoe_train.config import DATA_CACHE, MODEL_FAMILIES, MODEL_SIZE_FIELDS, config_get
from vmoe_train.config.fields import resolve_pp
from vmoe_train.config.model_checks import resolve_sizes
from vmoe_train.config.overrides import deep_tuple
from vmoe_train.state import TrainState

__all__ = [
    "Setup",
    "build",
    "build_model",
    "data_cache",
    "eval_capacity_factor",
    "evaluation_capacity",
    "mesh_shape",
    "model_family",
    "model_sizes",
    "num_train_steps",
    "open_dataset",
    "routing_group_size",
    "tokens_per_image",
    "with_local_devices",
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
    num_steps: int  # `num_steps`, or `num_epochs` over the train split resolved to steps
    # The capacity factor evaluation routes with (`eval.capacity_factor`, or the router's own);
    # None for a dense model or a router without one. Evaluation metrics name it.
    eval_capacity: float | None = None

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
    config = with_local_devices(config)
    dataset = open_dataset(config)
    strategy_options = {}
    shape = mesh_shape(config, jax.device_count())
    if shape:
        strategy_options["mesh_shape"] = shape
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
    num_steps = num_train_steps(config, dataset)
    schedule = optim.make_schedule(config.optimizer, num_steps)
    init_model = steps.init_model(model)
    abstract_params = jax.eval_shape(lambda: init_model.init(jax.random.key(0), sample)["params"])
    optimizer = optim.make_optimizer(config.optimizer, num_steps, abstract_params)
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
        config,
        dataset,
        strategy,
        model,
        optimizer,
        schedule,
        train_step,
        eval_step,
        sample,
        num_steps,
        evaluation_capacity(model, capacity),
    )


EXPERT_STRATEGIES = ("expert", "expert_fsdp")  # built-ins with a (data, expert) mesh


def mesh_shape(config: Any, devices: int) -> tuple[int, ...]:
    """`sharding.mesh_shape`, or where it is () under an expert strategy with E experts: (devices
    / g, g) with g = gcd(E, devices), so that each device holds E / g whole experts (the V-MoE
    release's `num_expert_partitions = num_experts`: E=8 on 32 devices is (4, 8)); () otherwise
    (the strategy's default)."""
    given = tuple(config.sharding.mesh_shape)
    if given or config.sharding.strategy not in EXPERT_STRATEGIES:
        return given
    if model_family(config.model.name) != "V-MoE":
        return ()
    g = math.gcd(int(config.model.moe.num_experts), devices)
    return (devices // g, g)


def num_train_steps(config: Any, dataset: Any) -> int:
    """`num_steps`, or where `num_epochs` > 0: ceil(num_epochs x train examples / batch_size), as
    the V-MoE release counts them (configs saved before `num_epochs`: num_steps)."""
    epochs = float(config_get(config, "num_epochs", 0.0) or 0.0)
    if epochs <= 0:
        return int(config.num_steps)
    examples = dataset.num_examples(config.dataset.train_split)
    steps = math.ceil(epochs * examples / config.batch_size)
    warmup = int(config.optimizer.warmup_steps)
    if steps < max(warmup, 1):
        raise ValueError(
            f"num_epochs={epochs} of {examples} examples ({config.dataset.train_split}) at "
            f"batch_size={config.batch_size} is {steps} steps; it must be >= 1 and >= "
            f"optimizer.warmup_steps={warmup}"
        )
    return steps


def evaluation_capacity(model: vl.VisionTransformer, override: float | None) -> float | None:
    """The capacity factor `model` evaluates with: `override`, else its router's evaluation
    capacity (`eval_capacity_factor`, else `capacity_factor`); None where there is none (a dense
    model, or a router without a capacity, such as soft or dropless routing)."""
    if model.moe is None:
        return None
    router = vl.model_router(model)
    if getattr(router, "capacity_factor", None) is None:
        return None  # nothing an override could set
    if override is not None:
        return float(override)
    for name in ("eval_capacity_factor", "capacity_factor"):
        value = getattr(router, name, None)
        if value is not None:
            return float(value)
    return None


# ---------------------------------------------------------------------------------------------
# The data


def with_local_devices(config: Any) -> Any:
    """`config`, or a copy whose `pp.train` has `{local_devices}` replaced by this process's
    local device count (batch ops that work per device, such as the release's mixup, split the
    process's batch by it). The run keeps the resolved spec, so its checkpoints record it and a
    resume on another device count is refused by `resume.check_resume` (pp.train changed)."""
    resolved = resolve_pp(config.pp.train, jax.local_device_count())
    if resolved == config.pp.train:
        return config
    config = config.copy_and_resolve_references()
    config.pp.train = resolved
    return config


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

    Its sizes are `model_sizes(config.model)` (a preset's, or given field by field);
    `model.dropout_rate`, `model.dtype`, `model.param_dtype`, `model.classifier` and
    `model.representation_size` (if > 0) are the config's; a V-MoE ("V-MoE-..." or "V-MoE")
    takes `model.moe` (experts, layers, router and its options, expert type, dispatch dtype).
    `group_size` is the tokens per routing group (see `routing_group_size`; None: one image),
    `exchange` the sharding strategy's.
    """
    import jax.numpy as jnp

    model_config = config.model
    moe_options = {}
    if model_family(model_config.name) == "V-MoE":
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
    head_bias_init = float(config_get(model_config, "head_bias_init", 0.0))
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    model = _vision_transformer(
        model_config,
        num_classes=num_classes,
        dropout_rate=float(model_config.dropout_rate),
        dtype=dtypes[model_config.dtype],
        # "bfloat16": no float32 master copy; the routers' gates stay float32 (routers make them).
        param_dtype=dtypes[config_get(model_config, "param_dtype", "float32")],
        classifier=config_get(model_config, "classifier", "token"),
        representation_size=representation_size or None,
        head_bias_init=head_bias_init,
        remat=config_get(model_config, "remat", "none"),
        exchange=exchange,
        **moe_options,
    )
    updates: dict[str, Any] = {}
    if model.moe is not None:
        moe_dropout = float(config_get(model_config, "moe.dropout_rate", -1.0))
        updates["moe"] = dataclasses.replace(
            model.moe,
            expert_type=model_config.moe.expert_type,
            dispatch_dtype=config_get(model_config, "moe.dispatch_dtype", "") or None,
            expert_init=config_get(model_config, "moe.expert_init", "independent"),
            dropout_rate=None if moe_dropout < 0 else moe_dropout,
            variants=_to_dict(config_get(model_config, "moe.variants", None)),
        )
    return model.clone(**updates) if updates else model


def _to_dict(node: Any) -> dict[str, Any]:
    """A ConfigDict (or None, for configs saved before the field) as plain dicts."""
    if node is None:
        return {}
    return node.to_dict() if hasattr(node, "to_dict") else dict(node)


def model_family(name: Any) -> str | None:
    """The family of a model name, a preset's ("V-MoE-S/32") or a family alone ("V-MoE"):
    "V-MoE" or "ViT"; None for other names."""
    text = str(name)
    for family in MODEL_FAMILIES:
        if text == family or text.startswith(f"{family}-"):
            return family
    return None


def model_sizes(model_config: Any) -> dict[str, int]:
    """{field: size} for `MODEL_SIZE_FIELDS` (patch_size, hidden_size, num_layers, num_heads,
    mlp_dim) of `config.model`: the preset's that `model.name` names, each replaced by the
    config's field where that is > 0; for a family alone ("ViT", "V-MoE"), the config's fields,
    which must then all be > 0 (a ValueError names the missing ones). Configs saved before the
    size fields existed read as 0: the preset's sizes."""
    name = str(model_config.name)
    given = {f: int(config_get(model_config, f, 0) or 0) for f in MODEL_SIZE_FIELDS}
    try:
        return resolve_sizes(name, given)
    except ValueError as error:
        raise ValueError(f"model.name={name!r}: {error}") from None


def _vision_transformer(
    model_config: Any,
    *,
    num_experts: int | None = None,
    moe_layers: Any = None,
    router: str | None = None,
    router_options: dict[str, Any] | None = None,
    group_size: int | None = None,
    **options: Any,
) -> vl.VisionTransformer:
    """The model of `model_config`'s name and sizes (`model_sizes`), with the MoE part of a
    V-MoE and the other `VisionTransformer` fields from `options`."""
    moe = None
    if model_family(model_config.name) == "V-MoE":
        moe = vl.MoeConfig(
            num_experts=num_experts,
            layers=moe_layers,
            router=router,
            router_options=router_options or {},
            group_size=group_size,
        )
    return vl.VisionTransformer(moe=moe, **model_sizes(model_config), **options)


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
