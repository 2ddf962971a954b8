"""Sharding strategies: how a model and its batches are laid out over a device mesh.

A strategy owns a `jax.sharding.Mesh` and says where everything goes:

- `param_specs(params)`: a PartitionSpec for every parameter (a pytree like `params`);
- `batch_spec()`: the PartitionSpec of arrays whose leading axis is the batch;
- `exchange`: None (the XLA partitioner moves what it must) or an `ExpertExchange` that moves
  expert buffers between devices explicitly (all-to-all inside `shard_map`).

Built-ins:
  data    mesh ('data',): params replicated, batch split over every device.
  expert  mesh ('data', 'expert'): expert params split over 'expert' along their leading expert
          axis, other params replicated, batch split over both axes; buffers reach their
          experts by all-to-all (the original V-MoE layout).
  fsdp    mesh ('data', 'fsdp'): every parameter big enough is split over 'fsdp' along its
          largest divisible dimension (gathered by XLA when used), batch split over both axes.

All work on one device, on many host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)
and across processes (jax.distributed): `shard_params` and `shard_batch` build global arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vmoe_layers.exchange import AllToAllExchange, ExpertExchange
from vmoe_layers.moe import EXPERTS_KEY
from vmoe_routing import Registry

Array = jax.Array


@runtime_checkable
class ShardingStrategy(Protocol):
    """What a sharding strategy provides (built-in or from a plugin)."""

    mesh: Mesh

    def param_specs(self, params: Any) -> Any:
        """A PartitionSpec for every leaf of `params` (same tree structure)."""
        ...

    def batch_spec(self) -> PartitionSpec:
        """The PartitionSpec of the leading (batch) axis of inputs and labels."""
        ...

    @property
    def exchange(self) -> ExpertExchange | None:
        """How MoE layers move buffers to experts; pass it to the model."""
        ...


def make_mesh(shape: Sequence[int], names: Sequence[str], devices=None) -> Mesh:
    """A mesh of `shape` over `devices` (default: all, in process order), axes in Auto mode."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(shape)
    if any(not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"mesh_shape={shape} must be positive integers, one per axis {names}")
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh_shape={shape} (axes {tuple(names)}) needs {math.prod(shape)} devices; "
            f"there are {len(devices)}: allowed shapes multiply to {len(devices)}"
        )
    return Mesh(
        np.asarray(devices).reshape(shape), tuple(names), axis_types=(AxisType.Auto,) * len(shape)
    )


def _path_keys(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def is_expert_param(path) -> bool:
    """Whether a parameter (by its tree path) belongs to a MoE layer's expert stack."""
    return EXPERTS_KEY in _path_keys(path)


class _Strategy:
    """Shared helpers: shardings from specs and global arrays from host values."""

    mesh: Mesh
    batch_axes: tuple[str, ...]

    @property
    def exchange(self) -> ExpertExchange | None:
        return None

    def batch_spec(self) -> PartitionSpec:
        return PartitionSpec(self.batch_axes)

    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, self.batch_spec())

    def param_shardings(self, params: Any) -> Any:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.param_specs(params))

    def param_specs(self, params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(self.param_spec, params)

    def param_spec(self, path, leaf) -> PartitionSpec:
        raise NotImplementedError

    @property
    def num_batch_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    def shard_params(self, params: Any) -> Any:
        """Global arrays laid out by `param_specs` from the same host values on every process."""
        return jax.tree.map(_global_array, params, self.param_shardings(params))

    def shard_batch(self, batch: Any) -> Any:
        """Global arrays split by `batch_spec` from the same host batch on every process.

        The leading axis must be divisible by the number of batch shards."""
        sharding = self.batch_sharding()

        def put(x):
            if np.shape(x)[0] % self.num_batch_shards:
                raise ValueError(
                    f"batch of {np.shape(x)[0]} is not divisible by the {self.num_batch_shards} "
                    f"devices of the batch axes {self.batch_axes}"
                )
            return _global_array(x, sharding)

        return jax.tree.map(put, batch)


def _global_array(x: Any, sharding: NamedSharding) -> Array:
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@dataclasses.dataclass(frozen=True)
class DataParallel(_Strategy):
    """Params replicated on every device; the batch split over the one mesh axis 'data'."""

    name: ClassVar[str] = "data"
    batch_axes: ClassVar[tuple[str, ...]] = ("data",)

    mesh: Mesh

    @classmethod
    def create(
        cls, mesh_shape: Sequence[int] | None = None, devices: Sequence[Any] | None = None
    ) -> DataParallel:
        """mesh_shape = (data,); default (number of devices,)."""
        devices = list(jax.devices() if devices is None else devices)
        shape = (len(devices),) if mesh_shape is None else tuple(mesh_shape)
        if len(shape) != 1:
            raise ValueError(f"mesh_shape={shape} must be (data,) for strategy 'data'")
        return cls(make_mesh(shape, ("data",), devices))

    def param_spec(self, path, leaf) -> PartitionSpec:
        return PartitionSpec()


@dataclasses.dataclass(frozen=True)
class ExpertParallel(_Strategy):
    """Experts split over 'expert', the batch over ('data', 'expert'), all-to-all in between.

    Mesh ('data', 'expert') of shape (D, X): each expert lives on one column of X devices
    (E/X experts per device, replicated over 'data'); every other parameter is replicated.
    """

    name: ClassVar[str] = "expert"
    batch_axes: ClassVar[tuple[str, ...]] = ("data", "expert")

    mesh: Mesh

    @classmethod
    def create(
        cls, mesh_shape: Sequence[int] | None = None, devices: Sequence[Any] | None = None
    ) -> ExpertParallel:
        """mesh_shape = (data, expert); default (1, number of devices)."""
        devices = list(jax.devices() if devices is None else devices)
        shape = (1, len(devices)) if mesh_shape is None else tuple(mesh_shape)
        if len(shape) != 2:
            raise ValueError(f"mesh_shape={shape} must be (data, expert) for strategy 'expert'")
        return cls(make_mesh(shape, ("data", "expert"), devices))

    @property
    def exchange(self) -> AllToAllExchange:
        return AllToAllExchange(self.mesh, "expert", self.batch_axes)

    def param_spec(self, path, leaf) -> PartitionSpec:
        if not is_expert_param(path):
            return PartitionSpec()
        n = self.mesh.shape["expert"]
        if np.ndim(leaf) < 1 or np.shape(leaf)[0] % n:
            name = "/".join(_path_keys(path))
            num_experts = np.shape(leaf)[0] if np.ndim(leaf) else None
            raise ValueError(
                f"num_experts={num_experts} of {name} is not divisible by the 'expert' "
                f"mesh axis of size {n}; allowed: a multiple of {n} experts"
            )
        return PartitionSpec("expert")


@dataclasses.dataclass(frozen=True)
class FullySharded(_Strategy):
    """Every parameter of at least `min_size` elements split over 'fsdp' (largest divisible
    dimension); the batch split over ('data', 'fsdp'). XLA gathers params where they are used."""

    name: ClassVar[str] = "fsdp"
    batch_axes: ClassVar[tuple[str, ...]] = ("data", "fsdp")

    mesh: Mesh
    min_size: int = 1024

    @classmethod
    def create(
        cls,
        mesh_shape: Sequence[int] | None = None,
        devices: Sequence[Any] | None = None,
        min_size: int = 1024,
    ) -> FullySharded:
        """mesh_shape = (data, fsdp); default (1, number of devices)."""
        devices = list(jax.devices() if devices is None else devices)
        shape = (1, len(devices)) if mesh_shape is None else tuple(mesh_shape)
        if len(shape) != 2:
            raise ValueError(f"mesh_shape={shape} must be (data, fsdp) for strategy 'fsdp'")
        if not isinstance(min_size, int) or min_size < 0:
            raise ValueError(f"min_size={min_size!r} must be an integer >= 0")
        return cls(make_mesh(shape, ("data", "fsdp"), devices), min_size)

    def param_spec(self, path, leaf) -> PartitionSpec:
        shape = np.shape(leaf)
        n = self.mesh.shape["fsdp"]
        if math.prod(shape) < self.min_size:
            return PartitionSpec()
        divisible = [i for i, size in enumerate(shape) if size % n == 0]
        if not divisible:
            return PartitionSpec()
        axis = max(divisible, key=lambda i: (shape[i], -i))
        return PartitionSpec(*(["fsdp" if i == axis else None for i in range(len(shape))]))


STRATEGIES: Registry[ShardingStrategy] = Registry("vmoe_sharding_strategies", "sharding strategy")


def get_strategy(name: str, **options: Any) -> ShardingStrategy:
    """The sharding strategy registered as `name`, built with `options` (e.g. mesh_shape)."""
    return STRATEGIES.create(name, **options)


def available_strategies() -> list[str]:
    """Names of every installed sharding strategy (built-ins and plugins), sorted."""
    return STRATEGIES.names()
