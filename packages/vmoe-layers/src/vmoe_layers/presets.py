"""Model presets: the ViT and V-MoE papers' sizes, and small sizes that train on a CPU.

Names are "<family>-<size>/<patch>": family "ViT" (dense) or "V-MoE"; any positive patch size.

  size  hidden  layers  MLP   heads   source
  Ti    192     12      768   3       DeiT / ViT follow-ups (AugReg)
  S     384     12      1536  6       DeiT / AugReg   (ViT-S)
  S     512     8       2048  8       V-MoE paper      (V-MoE-S: the release's 8-layer S/32)
  B     768     12      3072  12      ViT paper, Table 1
  L     1024    24      4096  16      ViT paper, Table 1
  H     1280    32      5120  16      ViT paper, Table 1
  Mu    64      4       128   4       vmoe (CPU: tests, examples, the embedded digits)
  Nano  32      2       64    2       vmoe (CPU: the smallest that is still a real V-MoE)

"ViT-S" is the 12-layer, width-384 model; the dense twin of V-MoE-S/32 (same 8 blocks of 512,
no experts) is `create_model("V-MoE-S/32", moe_layers=())`.

V-MoE presets default to the paper's setup: E=32 experts ("Mu"/"Nano": 4) on every other block
("every-2"), top-K routing with K=2 and capacity factor 1.05, group = one image.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import vmoe_routing
from vmoe_layers.vit import MoeConfig, VisionTransformer


class Size(NamedTuple):
    hidden_size: int
    num_layers: int
    mlp_dim: int
    num_heads: int


VIT_SIZES = {
    "Ti": Size(192, 12, 768, 3),
    "S": Size(384, 12, 1536, 6),
    "B": Size(768, 12, 3072, 12),
    "L": Size(1024, 24, 4096, 16),
    "H": Size(1280, 32, 5120, 16),
    "Mu": Size(64, 4, 128, 4),
    "Nano": Size(32, 2, 64, 2),
}
VMOE_SIZES = {**VIT_SIZES, "S": Size(512, 8, 2048, 8)}
SMALL_SIZES = ("Mu", "Nano")
FAMILIES = ("ViT", "V-MoE")


def preset_names() -> list[str]:
    """Examples of valid names (any patch size works): the papers' models and the CPU ones."""
    return [
        "ViT-Ti/16", "ViT-S/16", "ViT-S/32", "ViT-B/16", "ViT-B/32", "ViT-L/16", "ViT-H/14",
        "V-MoE-S/32", "V-MoE-B/32", "V-MoE-B/16", "V-MoE-L/16", "V-MoE-H/14",
        "ViT-Mu/2", "V-MoE-Mu/2", "ViT-Nano/4", "V-MoE-Nano/4",
    ]  # fmt: skip


MOE_OPTIONS = ("num_experts", "moe_layers", "router", "router_options", "group_size")
PRESET_FIELDS = ("patch_size", "hidden_size", "num_layers", "mlp_dim", "num_heads", "moe")


def create_model(
    name: str,
    *,
    num_classes: int | None,
    num_experts: int | None = None,
    moe_layers: Any = None,
    router: str | vmoe_routing.Router | None = None,
    router_options: dict[str, Any] | None = None,
    group_size: int | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """The model `name` ("ViT-B/16", "V-MoE-S/32", "V-MoE-Mu/2", ...).

    Args:
      num_classes: head size; None for no head (pre-logits only).
      num_experts, moe_layers, router, router_options, group_size: the MoE part (V-MoE names
        only); defaults E=32 (4 for the CPU sizes), "every-2", "top_k", one group per image.
        `router` is a name or a router object (then E defaults to its num_experts);
        `router_options` are merged over the layer's
        `DEFAULT_ROUTER_OPTIONS` (k=2, capacity_factor=1.05), so `{"noise_std": 0.5}` keeps
        k=2 and C=1.05. `moe_layers=()` gives the V-MoE's dense twin.
      **overrides: any other `VisionTransformer` field (classifier, dropout_rate, dtype, ...);
        not the ones the name sets (`PRESET_FIELDS`).
    """
    match = re.fullmatch(r"(ViT|V-MoE)-([A-Za-z]+)/(\d+)", name)
    sizes = VMOE_SIZES if match and match.group(1) == "V-MoE" else VIT_SIZES
    if not match or match.group(2) not in sizes or int(match.group(3)) < 1:
        raise ValueError(
            f"unknown model {name!r}; allowed: <family>-<size>/<patch> with family in {FAMILIES}, "
            f"size in {list(VIT_SIZES)}, patch >= 1, e.g. {preset_names()[:4]}"
        )
    fields = {f.name for f in dataclasses.fields(VisionTransformer)} - {"parent", "name"}
    for option in overrides:
        if option in PRESET_FIELDS:
            raise ValueError(
                f"{option}= is set by the preset {name!r}; allowed overrides: the other "
                f"VisionTransformer fields, or build VisionTransformer(...) directly"
                + (
                    f"; set the MoE part with create_model's {list(MOE_OPTIONS)}"
                    if option == "moe"
                    else ""
                )
            )
        if option not in fields:
            allowed = sorted(fields - set(PRESET_FIELDS) - {"num_classes"})
            raise ValueError(f"unknown option {option}= for {name!r}; allowed: {allowed}")
    family, size_name, patch = match.group(1), match.group(2), int(match.group(3))
    moe_options = {
        "num_experts": num_experts,
        "moe_layers": moe_layers,
        "router": router,
        "router_options": router_options,
        "group_size": group_size,
    }
    moe = None
    if family == "V-MoE":
        if num_experts is None and not isinstance(router, str | None):
            num_experts = router.num_experts  # a router object says how many experts it routes to
        if num_experts is None:
            num_experts = 4 if size_name in SMALL_SIZES else 32
        if not isinstance(router, str | None) and router.num_experts != num_experts:
            raise ValueError(
                f"router {type(router).__name__} has num_experts={router.num_experts} but "
                f"num_experts={num_experts}; they must be equal (or leave num_experts out)"
            )
        moe = MoeConfig(
            num_experts=num_experts,
            layers="every-2" if moe_layers is None else moe_layers,
            router="top_k" if router is None else router,
            router_options=router_options or {},
            group_size=group_size,
        )
    else:
        given = [option for option, value in moe_options.items() if value is not None]
        if given:
            raise ValueError(
                f"{name} is a dense ViT: {', '.join(f'{o}=' for o in given)} need a V-MoE name "
                f"(e.g. {name.replace('ViT-', 'V-MoE-', 1)!r})"
            )
    return VisionTransformer(
        num_classes=num_classes,
        patch_size=patch,
        moe=moe,
        **sizes[size_name]._asdict(),
        **overrides,
    )


def count_params(model: VisionTransformer, image_size: int = 224, channels: int = 3) -> int:
    """Number of parameters of `model` for square images, from shapes only (no allocation)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
