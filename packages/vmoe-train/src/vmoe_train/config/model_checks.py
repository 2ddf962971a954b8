"""Validation of the model: its name against the images, the MoE fields, the router and its
options (the router is built), the routing groups against the batches, and the sharding."""

from __future__ import annotations

import math
import re
from typing import Any

from ml_collections import ConfigDict

from vmoe_train.config.checker import MISSING, Checker, error_message
from vmoe_train.config.data_checks import Images, hw_text, microsteps
from vmoe_train.config.fields import (
    DISPATCH_DTYPES,
    EXPERT_INITS,
    MODEL_FAMILIES,
    MODEL_SIZE_FIELDS,
    STRATEGY_AXES,
)


def _is_moe(checker: Checker) -> bool:
    from vmoe_train.setup import model_family

    model = checker.config.get("model")  # even a bad name says the family
    name = model.get("name") if isinstance(model, ConfigDict) else None
    return isinstance(name, str) and model_family(name) == "V-MoE"


def resolve_sizes(name: str, given: dict[str, int]) -> dict[str, int]:
    """{field: size} of `MODEL_SIZE_FIELDS` for the model `name` and the config's size fields
    `given` (0 = unset): the preset's sizes, each replaced by a given one; for a family alone
    ("ViT", "V-MoE") the given sizes, which must then all be set. `vmoe_train.setup.model_sizes`
    and the config check both read sizes here.

    Raises:
      ValueError: a family alone with unset sizes, or a name that is no preset (the message
        says what is allowed; the caller names the field).
    """
    import vmoe_layers

    if name in MODEL_FAMILIES:
        missing = [f"model.{f}" for f, size in given.items() if size <= 0]
        if missing:
            raise ValueError(
                f"names no preset, so every size must be given; missing (integers >= 1): "
                f"{', '.join(missing)}; or name a preset, e.g. {name}-S/32"
            )
        return dict(given)
    try:
        preset = vmoe_layers.create_model(name, num_classes=None)
    except ValueError as error:
        raise ValueError(
            f"{error_message(error)}; or a family alone {list(MODEL_FAMILIES)} with every "
            f"size field set ({', '.join(f'model.{f}' for f in MODEL_SIZE_FIELDS)})"
        ) from None
    return {f: size if size > 0 else int(getattr(preset, f)) for f, size in given.items()}


def _check_sizes(checker: Checker) -> dict[str, int] | None:
    """The model's sizes (`resolve_sizes`), or None where a problem was reported."""
    name = checker.get("model.name")
    given = {f: checker.get(f"model.{f}") for f in MODEL_SIZE_FIELDS}  # ints >= 0 if not MISSING
    if name is MISSING or MISSING in given.values():
        return None
    try:
        sizes = resolve_sizes(name, given)
    except ValueError as error:
        checker.add("model.name", str(error), name)
        return None
    hidden, heads = sizes["hidden_size"], sizes["num_heads"]
    if hidden % heads:
        whose = "" if given["num_heads"] else f" (the preset {name}'s; set model.num_heads)"
        divisors = [d for d in range(1, hidden + 1) if hidden % d == 0]
        checker.add(
            "model.num_heads",
            f"must divide model.hidden_size={hidden}{whose}; allowed: {divisors}",
            heads,
        )
        return None
    return sizes


def check_model(checker: Checker, dataset: Any, images: Images, devices: int | None) -> None:
    import vmoe_layers
    from vmoe_train.setup import build_model, tokens_per_image

    sizes = _check_sizes(checker)
    tokens = None
    if sizes is not None:
        hw = images.eval or images.train
        if hw is not None:
            p = sizes["patch_size"]
            if hw[0] % p or hw[1] % p:
                field = "model.patch_size" if checker.get("model.patch_size") else "model.name"
                checker.add(
                    field,
                    f"patch size {p} does not divide the {hw_text(hw)} images of the pp specs",
                    checker.get(field),
                )
            else:  # the config's classifier says if there is a class token
                gap = checker.get("model.classifier") == "gap"
                shape = vmoe_layers.VisionTransformer(
                    num_classes=None, classifier="gap" if gap else "token", **sizes
                )
                tokens = tokens_per_image(shape, hw)
    if not _is_moe(checker):
        return  # model.moe is ignored for a dense ViT
    num_experts = checker.int_("model.moe.num_experts", 1)
    layers = checker.get("model.moe.layers")
    if sizes is not None and layers is not MISSING:
        try:
            vmoe_layers.moe_block_indices(layers, sizes["num_layers"])
        except ValueError as error:
            checker.add(
                "model.moe.layers",
                f"{error_message(error)} (the model has {sizes['num_layers']} blocks)",
                layers,
            )
    checker.choice(
        "model.moe.expert_type",
        vmoe_layers.available_expert_types(),
        "expert type",
        vmoe_layers.EXPERT_TYPES,
    )
    checker.choice("model.moe.dispatch_dtype", DISPATCH_DTYPES, "dispatch dtype")
    checker.choice("model.moe.expert_init", EXPERT_INITS, "expert init")
    rate = checker.number("model.moe.dropout_rate", high=1, high_open=True)
    if rate is not MISSING and rate < 0 and rate != -1:
        checker.add("model.moe.dropout_rate", "must be in [0, 1), or -1 (model.dropout_rate)", rate)
    _check_router(checker, num_experts)
    _check_variants(checker)
    _check_groups(checker, tokens, devices)
    if sizes is not None and not any(path.startswith("model.") for path in checker.bad):
        try:
            model = build_model(checker.config, num_classes=getattr(dataset, "num_classes", None))
            if model.moe is not None and model.moe.variants:
                # The shape the variants make (e.g. m dividing the experts' width), and the
                # router and experts built from it.
                layer = vmoe_layers.moe_layer(model)
                layer.make_router()
                layer.make_experts()
        except (ValueError, TypeError) as error:
            checker.add("model", error_message(error))


def _check_router(checker: Checker, num_experts: Any) -> None:
    import vmoe_layers
    import vmoe_routing

    router = checker.choice(
        "model.moe.router", vmoe_routing.available_routers(), "router", vmoe_routing.ROUTERS
    )
    options = checker.get("model.moe.router_options")
    if router is MISSING or options is MISSING or num_experts is MISSING:
        return
    options = options.to_dict()
    if "num_experts" in options:
        checker.add(
            "model.moe.router_options.num_experts",
            "set model.moe.num_experts instead",
            options["num_experts"],
        )
        return
    defaults = {
        key: value
        for key, value in vmoe_layers.DEFAULT_ROUTER_OPTIONS.items()
        if vmoe_routing.ROUTERS.accepts(router, key)
    }
    merged = {**defaults, **options}
    try:
        vmoe_routing.get_router(router, num_experts=num_experts, **merged)
    except (ValueError, TypeError) as error:
        text = re.sub(r"\bnum_experts=", "model.moe.num_experts=", error_message(error))
        match = re.match(r"^(\w+)=(\S+?):? (.*)$", text)
        if match and match.group(1) in merged:
            option = match.group(1)
            default = "" if option in options else " (the default; set it in router_options)"
            checker.problems.append(
                f"model.moe.router_options.{option}={match.group(2)}: {match.group(3)}{default}"
            )
        else:
            checker.problems.append(f"model.moe.router_options: {text}")
        checker.bad.add("model.moe.router_options")


def _check_variants(checker: Checker) -> None:
    """Each MoE layer variant named in model.moe.variants exists (else: the package that
    provides it) and takes its options; the layer shape they make is checked by building the
    model."""
    import vmoe_layers

    node = checker.config.model.moe
    variants = node.get("variants") if isinstance(node, ConfigDict) else None
    if not variants:
        return
    if not isinstance(variants, ConfigDict):
        checker.add("model.moe.variants", "must be a group {variant name: {option: value}}")
        return
    for name, options in variants.items():
        path = f"model.moe.variants.{name}"
        if not isinstance(options, ConfigDict):
            checker.add(path, "must be a group of the variant's options ({} for its defaults)")
            continue
        try:
            vmoe_layers.get_variant(name, **options.to_dict())
        except (ValueError, TypeError) as error:
            checker.add(path, error_message(error))


def _check_groups(checker: Checker, tokens: int | None, devices: int | None) -> None:
    group = checker.int_("model.moe.group_images", 0)
    if group is MISSING:
        return
    if group == 0:  # a group is the per-device train batch, at evaluation too (one model)
        train, evaluation = checker.get("batch_size"), checker.get("eval_batch_size")
        if train is not MISSING and evaluation is not MISSING and evaluation % train:
            checker.add(
                "eval_batch_size",
                f"must be a multiple of batch_size={train} with model.moe.group_images=0 "
                "(a routing group is then the per-device train batch); or set group_images",
                evaluation,
            )
        return
    for path in ("batch_size", "eval_batch_size"):
        size = checker.get(path)
        if size is MISSING:
            continue
        # Training routes each microbatch on its own (optimizer.microsteps).
        n = microsteps(checker) if path == "batch_size" else 1
        if size % ((devices or 1) * n):
            continue  # reported with the batch size
        per_device = size // (devices or 1) // n
        parts = [f"{path}={size}"]
        parts += [f"{devices} devices"] if devices else []
        parts += [f"{n} microsteps"] if n > 1 else []
        where = f"{path}={size}"
        if len(parts) > 1:
            kind = "microbatch" if n > 1 else "batch"
            where = f"the per-device {kind} ({' / '.join(parts)} = {per_device})"
        if per_device % group:
            detail = ""
            if tokens:
                detail = (
                    f": a routing group of {group} x {tokens} = {group * tokens} tokens does not "
                    f"divide the {per_device} x {tokens} = {per_device * tokens} tokens"
                )
            checker.add("model.moe.group_images", f"must be 0 or divide {where}{detail}", group)
            return


def check_sharding(checker: Checker, devices: int | None) -> None:
    import vmoe_layers

    strategy = checker.choice(
        "sharding.strategy", vmoe_layers.available_strategies(), "sharding strategy"
    )
    shape = checker.get("sharding.mesh_shape")
    if shape is MISSING:
        return
    from vmoe_plugins import is_int

    if not all(is_int(n) and n >= 1 for n in shape):
        checker.add("sharding.mesh_shape", "must be () or a tuple of integers >= 1", shape)
        return
    axes = STRATEGY_AXES.get(strategy) if strategy is not MISSING else None
    if shape and axes is not None and len(shape) != len(axes):
        checker.add(
            "sharding.mesh_shape",
            f"must have {len(axes)} ax{'i' if len(axes) == 1 else 'e'}s {axes} for "
            f"sharding.strategy={strategy!r}",
            shape,
        )
        return
    if shape and devices and math.prod(shape) != devices:
        checker.add(
            "sharding.mesh_shape",
            f"needs {math.prod(shape)} devices; there are {devices}: its product must be "
            f"{devices} (or () for the strategy's default)",
            shape,
        )
        return
    if strategy in ("expert", "expert_fsdp") and _is_moe(checker) and shape:
        # () is always valid: the default mesh's expert axis is gcd(E, devices).
        experts = checker.get("model.moe.num_experts")
        size = shape[1]
        if experts is not MISSING and experts % size:
            fits = (
                f" (e.g. ({devices // math.gcd(experts, devices)}, {math.gcd(experts, devices)}))"
            )
            checker.add(
                "sharding.mesh_shape",
                f"its 'expert' axis ({size}) must divide model.moe.num_experts={experts} for "
                f"sharding.strategy={strategy!r}; or () for (devices / g, g), g = gcd(E, "
                f"devices){fits if devices else ''}",
                shape,
            )
