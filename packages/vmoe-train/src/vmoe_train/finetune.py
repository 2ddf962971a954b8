"""Fine-tuning: start from a checkpoint's parameters with a new head and/or a new resolution.

    loaded = restore_params(directory, restore_target(fresh_params, new_head=True))
    params = finetune_params(fresh_params, loaded, new_head=True)

`fresh_params` are the new model's initial parameters (its head has the new class count, its
position embeddings the new token count), laid out by a sharding strategy or not; `loaded`
come from a checkpoint. Every parameter of the same path and shape is taken from the checkpoint;
the position embeddings are resized (bilinear over the patch grid, the class token's embedding
kept); the head is the fresh one when `new_head` is set or its shape changed. With a new head, a
checkpoint's pre-logits layer that the new model does not have is left behind (the V-MoE
release fine-tunes without it: a new head on the encoder's output). Anything else that differs
is an error naming the paths, so a wrong checkpoint never half-loads.

Where the parameters live: `restore_target` reads every parameter that is taken as it is
straight into the fresh parameter's sharding (each process reads only its slices, no copy of the
model on one device); only what must change on the host (position embeddings to resize, a head
that is replaced) is read there, and placed as the fresh parameter is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vmoe_train.mismatch import TreeMismatchError

HEAD_PREFIX = "head/"
PRE_LOGITS_PREFIX = "pre_logits/"
POS_EMBEDDING = "pos_embedding"


def resize_pos_embedding(loaded_1td: Any, target_shape: tuple[int, ...], has_class_token: bool):
    """[1, T, D] position embeddings -> target [1, T', D]: the patch grid resized bilinearly
    (square grids), the class token's row kept as it is."""
    loaded = np.asarray(loaded_1td)
    extra = 1 if has_class_token else 0
    old_n, new_n = loaded.shape[1] - extra, target_shape[1] - extra
    old_side, new_side = math.isqrt(old_n), math.isqrt(new_n)
    if old_side**2 != old_n or new_side**2 != new_n or loaded.shape[2] != target_shape[2]:
        raise ValueError(
            f"cannot resize position embeddings {loaded.shape} -> {tuple(target_shape)}: only "
            "square patch grids of the same width resize"
        )
    grid = loaded[0, extra:].reshape(old_side, old_side, -1)
    resized = jax.image.resize(jnp.asarray(grid), (new_side, new_side, grid.shape[-1]), "bilinear")
    rows = [loaded[0, :extra], np.asarray(resized).reshape(new_n, -1)]
    return np.concatenate(rows, axis=0)[None].astype(loaded.dtype)


def restore_target(fresh: Any, *, new_head: bool = True) -> Callable[[Any], Any]:
    """For `checkpoints.restore_params`: from the saved params' shapes, the tree to restore
    into: the fresh parameter's sharding where a saved array is taken as it is, the host
    elsewhere (see the module doc)."""
    fresh_flat = traverse_util.flatten_dict(fresh, sep="/")

    def target(saved: Any) -> Any:
        out = {}
        for path, leaf in traverse_util.flatten_dict(saved, sep="/").items():
            like = fresh_flat.get(path)
            kept = not (new_head and path.startswith(HEAD_PREFIX))
            sharding = getattr(like, "sharding", None)
            if kept and like is not None and np.shape(like) == tuple(leaf.shape) and sharding:
                out[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
            else:
                out[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        return traverse_util.unflatten_dict(out, sep="/")

    return target


def place(host: Any, like: Any) -> Any:
    """`host` (numpy) laid out as `like` (a jax.Array: its sharding; each process puts only its
    own slices), in `like`'s dtype."""
    host = np.asarray(host, dtype=like.dtype)
    if isinstance(like, jax.Array):
        return jax.make_array_from_callback(host.shape, like.sharding, lambda index: host[index])
    return jnp.asarray(host)


def finetune_params(
    fresh: Any, loaded: Any, *, new_head: bool = True, has_class_token: bool = True
) -> Any:
    """`fresh` with every compatible parameter replaced by the checkpoint's (see module doc)."""
    fresh_flat = traverse_util.flatten_dict(fresh, sep="/")
    loaded_flat = traverse_util.flatten_dict(loaded, sep="/")
    missing = sorted(set(fresh_flat) - set(loaded_flat) - _head_keys(fresh_flat))
    left_behind = _head_keys(loaded_flat)
    if new_head:  # the new head sits on whatever the new model's pre-logits are
        left_behind |= {p for p in loaded_flat if p.startswith(PRE_LOGITS_PREFIX)}
    extra = sorted(set(loaded_flat) - set(fresh_flat) - left_behind)
    mismatched = []
    out = {}
    for path, value in fresh_flat.items():
        if path.startswith(HEAD_PREFIX) and (new_head or path not in loaded_flat):
            out[path] = value
            continue
        if path not in loaded_flat:
            continue  # reported in `missing`
        old = loaded_flat[path]
        if np.shape(old) == np.shape(value):
            if isinstance(old, jax.Array) and isinstance(value, jax.Array):  # laid out already
                out[path] = old if old.dtype == value.dtype else old.astype(value.dtype)
            else:
                out[path] = place(old, value)
        elif path.endswith(POS_EMBEDDING):
            resized = resize_pos_embedding(old, np.shape(value), has_class_token)
            out[path] = place(resized, value)
        elif path.startswith(HEAD_PREFIX):
            out[path] = value  # a new class count: the head starts fresh
        else:
            mismatched.append((path, np.shape(old), np.shape(value)))
    if missing or extra or mismatched:
        raise TreeMismatchError(missing, extra, mismatched)
    return traverse_util.unflatten_dict(out, sep="/")


def _head_keys(flat: dict[str, Any]) -> set[str]:
    return {p for p in flat if p.startswith(HEAD_PREFIX)}
