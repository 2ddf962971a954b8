"""What model an original V-MoE checkpoint holds, read from its array shapes, and the settings
that make our model compute what the original computed.

    arch = infer_architecture({path: shape})   # sizes, blocks, MoE blocks, head, classifier
    model_fields(arch)                         # the config's `model` fields for it (any size)
    mismatches(arch, {"model.num_heads": 8})   # config fields the checkpoint contradicts

The forward pass of the original release, and what must match for parity (evaluation, no
randomness; `RELEASE_MOE` holds the values of the release's configs, vmoe/configs/vmoe_paper):

  - LayerNorm epsilon 1e-6 and GELU with the tanh approximation (flax's defaults, used by
    both): nothing to set.
  - Routing: top-K over the softmax of x W (no bias), raw softmax values as combine weights,
    K-major buffer filling in token order ("top_k"; "bpr" for Batch Priority Routing), K=2.
  - Capacity per expert ceil(K * C * S / E) rounded up to a multiple of 4
    (`capacity_multiple_of=4`); C at evaluation 4.0 (`eval_capacity_factor`), 1.05 in training.
    Our capacity is never above S (slots beyond S always stay empty: outputs are the same).
  - Routing groups of 8 images (`group_images=8`: the release's group size, 8 x tokens).
  - Expert buffers rounded to bfloat16 on the way to and from the experts
    (`dispatch_dtype="bfloat16"`, the release's bfloat16 dispatcher); everything else float32.
  - No gating noise at evaluation (the router is deterministic; noise_std only in training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from vmoe_train.config.fields import MODEL_SIZE_FIELDS
from vmoe_train.original.mapping import ENCODER

# The release's MoE settings (V-MoE paper configs): routing, capacity, groups, dispatch.
RELEASE_ROUTER_OPTIONS: Mapping[str, Any] = {
    "k": 2,
    "capacity_factor": 1.05,
    "eval_capacity_factor": 4.0,
    "capacity_multiple_of": 4,
    "noise_std": 1.0,
    "importance_loss_weight": 0.005,
    "load_loss_weight": 0.005,
}
RELEASE_MOE: Mapping[str, Any] = {
    "router": "top_k",
    "router_options": RELEASE_ROUTER_OPTIONS,
    "group_images": 8,
    "dispatch_dtype": "bfloat16",
    "expert_type": "mlp",
}

_BLOCK = re.compile(rf"{ENCODER}/encoderblock_(\d+)/")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The model an original checkpoint holds.

    Attributes:
      patch_size: P (square patches).
      hidden_size, num_layers, num_heads, mlp_dim: D, L, heads, H.
      num_tokens: T, the position embeddings' length (patches, plus the class token if any).
      classifier: "token" (a `cls` array) or "gap".
      representation_size: the pre-logits layer's width, or None.
      num_classes: the head's width, or None without a head.
      num_experts: E of the MoE blocks (None without any).
      moe_layers: the 0-indexed MoE blocks.
    """

    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_tokens: int
    classifier: str
    representation_size: int | None
    num_classes: int | None
    num_experts: int | None
    moe_layers: tuple[int, ...]

    @property
    def image_size(self) -> int | None:
        """The side of the square images the position embeddings fit, or None."""
        patches = self.num_tokens - (self.classifier == "token")
        side = math.isqrt(patches)
        return side * self.patch_size if side * side == patches else None


def infer_architecture(shapes: Mapping[str, tuple[int, ...]]) -> Architecture:
    """The `Architecture` of an original checkpoint from its {path: shape}.

    Reads only what it needs (the patch embedding, the first block's attention and MLP, one
    router, the head); the whole tree is checked later against the model built from it. What
    it cannot find is reported all at once.
    """
    problems: list[str] = []

    def shape(path: str, rank: int) -> tuple[int, ...] | None:
        found = shapes.get(path)
        if found is None:
            problems.append(f"{path}: missing")
        elif len(found) != rank:
            problems.append(f"{path}: shape {tuple(found)} must have {rank} axes")
            found = None
        return found

    blocks = sorted({int(m.group(1)) for p in shapes if (m := _BLOCK.match(p))})
    moe_layers = tuple(
        b for b in blocks if any(p.startswith(f"{ENCODER}/encoderblock_{b}/Moe/") for p in shapes)
    )
    embedding = shape("embedding/kernel", 4)
    positions = shape(f"{ENCODER}/posembed_input/pos_embedding", 3)
    if not blocks:
        problems.append(f"{ENCODER}/encoderblock_0: missing (no encoder blocks)")
    first = f"{ENCODER}/encoderblock_{blocks[0] if blocks else 0}"
    query = shape(f"{first}/SelfAttention/query/kernel", 3)
    dense = [b for b in blocks if b not in moe_layers]
    mlp = None
    if dense:
        mlp = shape(f"{ENCODER}/encoderblock_{dense[0]}/Mlp/Dense_0/kernel", 2)
    elif moe_layers:
        mlp = shape(f"{ENCODER}/encoderblock_{moe_layers[0]}/Moe/Mlp/Dense_0/kernel", 3)
    router = None
    if moe_layers:
        router = shape(f"{ENCODER}/encoderblock_{moe_layers[0]}/Moe/Router/dense/kernel", 2)
    head = shapes.get("head/kernel")
    representation = shapes.get("pre_logits/kernel")
    if embedding is not None and embedding[0] != embedding[1]:
        problems.append(f"embedding/kernel: shape {embedding}: only square patches are supported")
    if embedding is not None and query is not None:
        hidden, (width, heads, head_dim) = embedding[3], query
        if width != hidden or heads * head_dim != hidden:
            problems.append(
                f"{first}/SelfAttention/query/kernel: shape {tuple(query)} must be [hidden, "
                f"heads, head_dim] with hidden = heads x head_dim = {hidden} (the embedding's)"
            )
    if problems:
        raise ValueError(
            f"cannot tell the model of this checkpoint ({len(problems)} problem(s)): "
            + "; ".join(problems)
        )
    assert embedding and positions and query and mlp  # for the type checker: problems above
    return Architecture(
        patch_size=embedding[0],
        hidden_size=embedding[3],
        num_layers=blocks[-1] + 1,
        num_heads=query[1],
        mlp_dim=mlp[-1],
        num_tokens=positions[1],
        classifier="token" if "cls" in shapes else "gap",
        representation_size=representation[-1] if representation else None,
        num_classes=head[-1] if head else None,
        num_experts=router[-1] if router else None,
        moe_layers=moe_layers,
    )


def moe_layers_spec(arch: Architecture) -> str | tuple[int, ...]:
    """The MoE blocks as "every-n" / "last-n" when they are that, else the tuple."""
    from vmoe_layers import moe_block_indices

    for spec in [f"every-{n}" for n in range(2, arch.num_layers + 1)] + [
        f"last-{n}" for n in range(1, arch.num_layers // 2 + 1)
    ]:
        if arch.moe_layers and moe_block_indices(spec, arch.num_layers) == arch.moe_layers:
            return spec
    return arch.moe_layers


def model_fields(arch: Architecture) -> dict[str, Any]:
    """The config's `model` fields for `arch`, sizes given one by one (any consistent size, not
    only the presets'): {"name": "V-MoE", "patch_size": P, "hidden_size": D, ..., "moe": {...}},
    with the release's MoE settings; "ViT" for a dense checkpoint (its unused `moe` section
    valid: one expert, k=1)."""
    moe = {**RELEASE_MOE, "router_options": dict(RELEASE_ROUTER_OPTIONS)}
    moe["num_experts"] = arch.num_experts or 1
    moe["layers"] = moe_layers_spec(arch)
    if not arch.num_experts:  # a dense ViT (e.g. a vit_jax file): its `moe` section is unused
        moe["router_options"]["k"] = 1
    return {
        "name": "V-MoE" if arch.num_experts else "ViT",
        **{field: getattr(arch, field) for field in MODEL_SIZE_FIELDS},
        "classifier": arch.classifier,
        "representation_size": arch.representation_size or 0,
        "dtype": "float32",
        "dropout_rate": 0.0,
        "moe": moe,
    }


# Where `infer_architecture` reads each field of the config's model from (for messages).
SOURCES: Mapping[str, str] = {
    "model.patch_size": "embedding/kernel [P, P, C, D]",
    "model.hidden_size": "embedding/kernel [P, P, C, D]",
    "model.num_layers": "the encoderblock_<i> names",
    "model.num_heads": "SelfAttention/query/kernel [D, heads, D / heads]",
    "model.mlp_dim": "Mlp/Dense_0/kernel [D, H] or Moe/Mlp/Dense_0/kernel [E, D, H]",
    "model.classifier": "a `cls` array, or none (gap)",
    "model.representation_size": "pre_logits/kernel [D, R], or none (0)",
    "model.moe.num_experts": "Moe/Router/dense/kernel [D, E]",
    "model.moe.layers": "the blocks with Moe/ arrays",
    "model.name": "the blocks with Moe/ arrays",
}


def mismatches(arch: Architecture, fields: Mapping[str, Any]) -> list[str]:
    """One problem per field of `fields` ({"model.hidden_size": 32, ...}, any of `SOURCES`) that
    describes another model than `arch`, naming the value, the checkpoint's and its source.

    "model.moe.layers" is compared as block indices ("every-2" = (1, 3) in 4 blocks),
    "model.representation_size" 0 as none, "model.name" by its family (V-MoE or dense ViT)."""
    from vmoe_layers import moe_block_indices
    from vmoe_train.setup import model_family

    expected: dict[str, Any] = {f"model.{f}": getattr(arch, f) for f in MODEL_SIZE_FIELDS}
    expected["model.classifier"] = arch.classifier
    expected["model.representation_size"] = arch.representation_size or 0
    expected["model.moe.num_experts"] = arch.num_experts
    expected["model.moe.layers"] = arch.moe_layers
    problems = []
    for path, given in fields.items():
        value, want = given, expected.get(path)
        if path == "model.moe.layers":
            with contextlib.suppress(ValueError):  # else not blocks of this model: unequal
                value = moe_block_indices(given, arch.num_layers)
        if path == "model.name":
            if model_family(given) == "ViT" and arch.moe_layers:
                problems.append(
                    f"model.name={given!r} is a dense ViT; the checkpoint has MoE blocks "
                    f"{list(arch.moe_layers)} (read from {SOURCES[path]}): name a V-MoE"
                )
            continue
        if path == "model.moe.num_experts" and not arch.moe_layers:
            continue  # no MoE block: no experts to count
        if value != want:
            problems.append(
                f"{path}={given!r}: the checkpoint's is {want!r} (read from {SOURCES[path]}); "
                "leave the field out to take the checkpoint's"
            )
    return problems
