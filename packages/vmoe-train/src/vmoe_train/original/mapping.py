"""Parameter names of the original V-MoE release and of vmoe-layers, one to one, both ways.

    original (vmoe/nn/vit_moe.py)                          vmoe-layers
    embedding/{kernel [P, P, C, D], bias}                  embedding/...
    cls [1, 1, D]                                          cls
    Encoder/posembed_input/pos_embedding [1, T, D]         pos_embedding
    Encoder/encoderblock_<i>/LayerNorm_0/{scale, bias}     block_<i>/norm_attention/...
    Encoder/encoderblock_<i>/SelfAttention/<q|k|v|out>/..  block_<i>/attention/...
    Encoder/encoderblock_<i>/LayerNorm_1/{scale, bias}     block_<i>/norm_mlp/...
    Encoder/encoderblock_<i>/Mlp/Dense_0/{kernel, bias}    block_<i>/mlp/{w_in, b_in}
    Encoder/encoderblock_<i>/Mlp/Dense_1/{kernel, bias}    block_<i>/mlp/{w_out, b_out}
    .../Moe/Mlp/Dense_0/{kernel [E, D, H], bias [E, H]}    block_<i>/moe/experts/{w_in, b_in}
    .../Moe/Mlp/Dense_1/{kernel [E, H, D], bias [E, D]}    block_<i>/moe/experts/{w_out, b_out}
    .../Moe/Router/dense/kernel [D, E]                     block_<i>/moe/router/gate
    Encoder/encoder_norm/{scale, bias}                     encoder_norm/...
    pre_logits/{kernel, bias} (with a representation)      pre_logits/...
    head/{kernel, bias}                                    head/...

Every array keeps its shape and layout (both sides are flax modules with the same conventions:
Dense kernels [in, out], attention kernels [D, heads, head_dim] and [heads, head_dim, D], the
experts stacked on a leading E axis), so the mapping is a renaming. Names are checked against
the public V-MoE code (vit_moe.py and its tests). Also read, as aliases, the automatic names of
the ViT code the V-MoE encoder block descends from (vit_jax: `MultiHeadDotProductAttention_1`,
`LayerNorm_2`, `MlpBlock_3`, and `Transformer` for `Encoder`); written names are always the
V-MoE ones. Only the `mlp` expert type has original names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from vmoe_train import mismatch
from vmoe_train.mismatch import TreeMismatchError

ENCODER = "Encoder"
_TOP = {
    "embedding": "embedding",
    "cls": "cls",
    f"{ENCODER}/posembed_input/pos_embedding": "pos_embedding",
    f"{ENCODER}/encoder_norm": "encoder_norm",
    "pre_logits": "pre_logits",
    "head": "head",
}
_BLOCK = {
    "LayerNorm_0": "norm_attention",
    "SelfAttention": "attention",
    "LayerNorm_1": "norm_mlp",
    "Mlp/Dense_0/kernel": "mlp/w_in",
    "Mlp/Dense_0/bias": "mlp/b_in",
    "Mlp/Dense_1/kernel": "mlp/w_out",
    "Mlp/Dense_1/bias": "mlp/b_out",
    "Moe/Mlp/Dense_0/kernel": "moe/experts/w_in",
    "Moe/Mlp/Dense_0/bias": "moe/experts/b_in",
    "Moe/Mlp/Dense_1/kernel": "moe/experts/w_out",
    "Moe/Mlp/Dense_1/bias": "moe/experts/b_out",
    "Moe/Router/dense/kernel": "moe/router/gate",
}
_LEAVES = {  # what a prefix of _TOP / _BLOCK may be followed by
    "embedding": ("kernel", "bias"),
    "encoder_norm": ("scale", "bias"),
    "pre_logits": ("kernel", "bias"),
    "head": ("kernel", "bias"),
    "norm_attention": ("scale", "bias"),
    "norm_mlp": ("scale", "bias"),
    "attention": tuple(
        f"{p}/{w}" for p in ("query", "key", "value", "out") for w in ("kernel", "bias")
    ),
}
_VIT_ALIASES = {
    "MultiHeadDotProductAttention_1": "SelfAttention",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "Mlp",
}
_ORIGINAL_BLOCK = re.compile(rf"{ENCODER}/encoderblock_(\d+)/(.+)")
_OUR_BLOCK = re.compile(r"block_(\d+)/(.+)")


def _pairs() -> list[tuple[str, str, bool]]:
    """(original prefix, our prefix, is a block name) for every name group."""
    return [(o, ours, False) for o, ours in _TOP.items()] + [
        (o, ours, True) for o, ours in _BLOCK.items()
    ]


def _rename(path: str, source: int) -> str | None:
    """`path` in the other naming (source 0: original -> ours; 1: ours -> original)."""
    block = (_ORIGINAL_BLOCK if source == 0 else _OUR_BLOCK).fullmatch(path)
    rest, number = (block.group(2), block.group(1)) if block else (path, None)
    for pair in _pairs():
        original, ours, in_block = pair
        if in_block != (block is not None):
            continue
        given, other = (original, ours) if source == 0 else (ours, original)
        if rest == given:
            tail = ""
        elif rest.startswith(given + "/"):
            tail = rest[len(given) :]
            if tail[1:] not in _LEAVES.get(ours, ()):
                return None
        else:
            continue
        if tail == "" and ours in _LEAVES:
            return None  # a group, not an array
        if block is None:
            return other + tail
        return (f"block_{number}/" if source == 0 else f"{ENCODER}/encoderblock_{number}/") + (
            other + tail
        )
    return None


def to_ours(original_path: str) -> str | None:
    """Our name for an original parameter path, or None when it has no counterpart."""
    return _rename(_unalias(original_path), 0)


def to_original(our_path: str) -> str | None:
    """The original name of one of our parameter paths, or None (e.g. a `glu` expert)."""
    return _rename(our_path, 1)


def _unalias(path: str) -> str:
    """vit_jax's automatic names -> V-MoE's (see the module doc)."""
    parts = path.split("/")
    if parts[0] == "Transformer":
        parts[0] = ENCODER
    if len(parts) > 2 and parts[0] == ENCODER and parts[1].startswith("encoderblock_"):
        parts[2] = _VIT_ALIASES.get(parts[2], parts[2])
    return "/".join(parts)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x} (flax FrozenDicts too)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *groups, leaf = path.split("/")
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = value
    return tree


def rename_all(
    paths: Iterable[str], rename: Callable[[str], str | None], layout: str
) -> dict[str, str]:
    """{path: rename(path)} for every path; a ValueError names every path without a name in
    `layout` (rename gave None), e.g. layout="the original V-MoE layout (only ...)"."""
    renamed = {path: rename(path) for path in paths}
    unnamed = sorted(path for path, name in renamed.items() if name is None)
    if unnamed:
        raise ValueError(f"{len(unnamed)} parameter(s) have no name in {layout}: {unnamed}")
    return {path: name for path, name in renamed.items() if name is not None}


def original_names(expected_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Our {path: shape} as {original path: shape}; a ValueError names paths without one."""
    layout = "the original V-MoE layout (only the ViT MLP, `mlp`, experts do)"
    renamed = rename_all(expected_shapes, to_original, layout)
    return {renamed[path]: tuple(shape) for path, shape in expected_shapes.items()}


def check_fit(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    hints: Any = (),
) -> None:
    """Raises `TreeMismatchError` listing every missing, extra and mismatched path (all names
    original, `found` possibly with vit_jax's aliases), or returns when they agree."""
    mismatch.check_fit(expected, found, hints=hints, name=_unalias)


def params_from_original(arrays: Mapping[str, Any]) -> dict[str, Any]:
    """Our nested params tree from {original path: array} (names checked: see `check_fit`)."""
    flat = {}
    unknown = []
    for path, array in arrays.items():
        ours = to_ours(path)
        if ours is None:
            unknown.append(path)
        else:
            flat[ours] = array
    if unknown:
        raise TreeMismatchError([], sorted(unknown), [])
    return unflatten(flat)


def params_to_original(params: Mapping[str, Any]) -> dict[str, Any]:
    """{original path: array} from our params tree (a nested map)."""
    flat = flatten(params)
    original_names({path: np.shape(value) for path, value in flat.items()})  # all named?
    return {to_original(path): value for path, value in flat.items()}
