"""Routing groups split over devices: per-group random keys, and statistics combined exactly.

Routers decide every group independently (the aux losses and metrics of a decision are means
over groups), so a batch's groups can be routed on the devices that hold them, inside
`jax.shard_map`, with the same result as routing them all at once, given two things:

- the gating noise of a group must not depend on which device routes it: routers draw it with
  `gate_noise`, group g's from its own key (`group_keys`, the G-way split of the step's key,
  made once for the whole batch and split over devices with the groups);
- each device's group means must be combined into the batch's: `combine_over_shards` averages
  them over the batch's mesh axes (every device holds the same number of groups, so the mean of
  the per-device means is the mean over all groups). Statistics named `*_max` / `*_min` are
  maxima / minima over groups (e.g. the soft router's similarity maxima) and combine as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _key_shape(rng: Array) -> tuple[int, ...]:
    """The shape of a key array: typed keys (jax.random.key) or raw uint32 keys (PRNGKey)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.shape
    return rng.shape[:-1]


def group_keys(rng: Array, num_groups: int) -> Array:
    """[G] keys, one per routing group: `rng` split G ways, or `rng` itself if it already holds
    G keys (e.g. the groups of one device, sliced from the batch's split)."""
    shape = _key_shape(rng)
    if shape == ():
        return jax.random.split(rng, num_groups)
    if shape == (num_groups,):
        return rng
    raise ValueError(
        f"rng must be one key or one key per group ({num_groups} groups); got keys of shape {shape}"
    )


def gate_noise(rng: Array, shape: Sequence[int]) -> Array:
    """Standard normal noise of `shape` [G, ...], group g's drawn from `group_keys(rng, G)[g]`:
    the noise of a group is the same whichever device routes it and with whichever others."""
    keys = group_keys(rng, shape[0])
    return jax.vmap(lambda key: jax.random.normal(key, tuple(shape[1:])))(keys)


def _combine(path, value: Array, axis_names: tuple[str, ...]) -> Array:
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    if name.endswith("_max"):
        return jax.lax.pmax(value, axis_names)
    if name.endswith("_min"):
        return jax.lax.pmin(value, axis_names)
    return jax.lax.pmean(value, axis_names)


def combine_over_shards(stats: Any, axis_names: str | Sequence[str]) -> Any:
    """Per-device group statistics (a pytree of aux losses / metrics) -> the batch's, inside
    `shard_map` over `axis_names` (the axes the groups are split over): means are averaged,
    leaves named `*_max` / `*_min` take the maximum / minimum."""
    axes = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    return jax.tree_util.tree_map_with_path(lambda p, v: _combine(p, v, axes), stats)
