"""Sharding strategies: how a model and its batches are laid out over a device mesh.

A strategy owns a `jax.sharding.Mesh` and says where everything goes:

- `param_specs(params)`: a PartitionSpec for every parameter (a pytree like `params`);
- `batch_spec()`: the PartitionSpec of arrays whose leading axis is the batch;
- `exchange`: an `ExpertExchange` that decides where MoE layers route their groups and how
  the expert buffers meet the experts (None: the XLA partitioner decides). Every built-in has
  each device route its own groups inside `shard_map`: `data` and `fsdp` run every expert there
  (`PerShardExchange`), the expert strategies send the buffers to their experts' devices by
  all-to-all (`AllToAllExchange`).

Built-ins:
  data    mesh ('data',): params replicated, batch split over every device; MoE layers route
          and run their experts per device.
  expert  mesh ('data', 'expert'): expert params split over 'expert' along their leading expert
          axis, other params replicated, batch split over both axes; buffers reach their
          experts by all-to-all (the original V-MoE layout).
  fsdp    mesh ('data', 'fsdp'): every parameter big enough is split over 'fsdp' along its
          largest divisible dimension (gathered by XLA when used), batch split over both axes.
  expert_fsdp  mesh ('data', 'expert'): experts split over 'expert' (and over 'data' along
          another dimension), every other parameter big enough split over all devices; batch
          split over both axes; buffers by all-to-all as in `expert`.

All work on one device, on many host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)
and across processes (jax.distributed). The free functions `shard_params`, `shard_batch` and
`init_sharded` work with any strategy (built-in or plugin): they use only its mesh and specs.

Routers' state (the `router_state` collection, e.g. a balancing bias [E]) is not a parameter: it
is tiny, updated from statistics every device holds, and always replicated
(`router_state_shardings`, `init_router_state`), whatever the strategy's `param_specs` say.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vmoe_layers.exchange import AllToAllExchange, ExpertExchange, PerShardExchange
from vmoe_layers.moe import EXPERTS_KEY, ROUTER_STATE
from vmoe_plugins import Registry, check_int, is_int

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
        """Where MoE layers route their groups and how buffers reach the experts; pass it to
        the model."""
        ...


def make_mesh(shape: Sequence[int], names: Sequence[str], devices=None) -> Mesh:
    """A mesh of `shape` over `devices` (default: all, in process order), axes in Auto mode."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(shape)
    # The shared rule: numpy integers count (and become plain ints), bools do not.
    if any(not is_int(n) or n < 1 for n in shape):
        raise ValueError(f"mesh_shape={shape} must be positive integers, one per axis {names}")
    shape = tuple(int(n) for n in shape)
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
    """What the built-ins share: the batch split over `batch_axes`, params spec'd per leaf."""

    mesh: Mesh
    batch_axes: tuple[str, ...]

    @property
    def exchange(self) -> ExpertExchange | None:
        """Each device routes its own groups and runs every expert (the expert strategies
        override it with an all-to-all)."""
        return PerShardExchange(self.mesh, self.batch_axes)

    def batch_spec(self) -> PartitionSpec:
        return PartitionSpec(self.batch_axes)

    def param_specs(self, params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(self.param_spec, params)

    def param_spec(self, path, leaf) -> PartitionSpec:
        raise NotImplementedError


# Global arrays from any strategy (built-in or plugin): only its mesh and specs are used.


def _global_array(x: Any, sharding: NamedSharding) -> Array:
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def param_shardings(strategy: ShardingStrategy, params: Any) -> Any:
    """A NamedSharding per leaf of `params` (arrays or jax.ShapeDtypeStructs)."""
    specs = strategy.param_specs(params)
    return jax.tree.map(lambda _, spec: NamedSharding(strategy.mesh, spec), params, specs)


def shard_params(strategy: ShardingStrategy, params: Any) -> Any:
    """Global arrays laid out by `strategy.param_specs`, from the same host values in every
    process (each process reads only the slices its devices hold)."""
    return jax.tree.map(_global_array, params, param_shardings(strategy, params))


def shard_batch(strategy: ShardingStrategy, batch: Any) -> Any:
    """Global arrays split by `strategy.batch_spec()`, from the same host batch in every process.

    The leading axis of every leaf must be divisible by the number of devices it is split over."""
    spec = strategy.batch_spec()
    sharding = NamedSharding(strategy.mesh, spec)
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(strategy.mesh.shape[a] for a in axes)

    def put(x):
        if np.shape(x)[0] % shards:
            raise ValueError(
                f"batch of {np.shape(x)[0]} is not divisible by the {shards} devices of the batch "
                f"axes {axes}; allowed: a multiple of {shards}"
            )
        return _global_array(x, sharding)

    return jax.tree.map(put, batch)


def init_sharded(strategy: ShardingStrategy, model: Any, rng: Array, sample: Any) -> Any:
    """`model.init(rng, sample)["params"]`, created already laid out by the strategy.

    Shapes come from `jax.eval_shape`; then one `jax.jit` with `out_shardings` makes every device
    initialise only its own slices: no full copy of the parameters exists on any host. Only the
    shape and dtype of `sample` matter (e.g. one image). The same `rng` in every process gives
    the same parameters as `model.init` on one device.
    """
    sample_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), sample)
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    key_data = np.asarray(jax.random.key_data(rng) if typed else rng)  # a constant in the jit
    impl = jax.random.key_impl(rng) if typed else None

    def init():
        key = jnp.asarray(key_data)
        if typed:
            key = jax.random.wrap_key_data(key, impl=impl)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sample_shapes)
        return model.init(key, zeros)["params"]

    shapes = jax.eval_shape(init)
    return jax.jit(init, out_shardings=param_shardings(strategy, shapes))()


def router_state_shardings(strategy: ShardingStrategy, router_state: Any) -> Any:
    """A replicated NamedSharding on the strategy's mesh per leaf of `router_state` (the
    `router_state` collection, arrays or jax.ShapeDtypeStructs): every device holds it whole."""
    replicated = NamedSharding(strategy.mesh, PartitionSpec())
    return jax.tree.map(lambda _: replicated, router_state)


def init_router_state(strategy: ShardingStrategy, model: Any, sample: Any) -> Any:
    """The `router_state` collection of `model.init(rng, sample)`, replicated on the strategy's
    mesh ({} for a model whose routers have no state; see `MoeLayer`). Only the shape and
    dtype of `sample` matter; routers' initial state takes no random key.

    With `init_sharded` (the params) it is what a training state starts from: pass both to
    `model.apply({"params": ..., "router_state": ...}, ..., mutable=["router_state"])`."""
    sample_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), sample)

    def init():
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sample_shapes)
        return dict(model.init(jax.random.key(0), zeros).get(ROUTER_STATE, {}))

    shapes = jax.eval_shape(init)
    return jax.jit(init, out_shardings=router_state_shardings(strategy, shapes))()


def _strategy_mesh(strategy: str, names: tuple[str, ...], mesh_shape, devices) -> Mesh:
    """The mesh of a built-in strategy: `mesh_shape` (default: every device on the last axis)."""
    devices = list(jax.devices() if devices is None else devices)
    default = (1,) * (len(names) - 1) + (len(devices),)
    shape = default if mesh_shape is None else tuple(mesh_shape)
    if len(shape) != len(names):
        axes = "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"
        raise ValueError(f"mesh_shape={shape} must be {axes} for strategy {strategy!r}")
    return make_mesh(shape, names, devices)


def _split_largest(shape, size: int, axes, min_size: int, skip: int = 0) -> list:
    """Spec entries that split the largest dimension of `shape` divisible by `size` (ties: the
    first) over `axes`, dimensions before `skip` left alone; [] (replicated) when the leaf has
    fewer than `min_size` elements, `size` is 1 or no dimension divides."""
    divisible = [i for i in range(skip, len(shape)) if shape[i] % size == 0]
    if size == 1 or math.prod(shape) < min_size or not divisible:
        return []
    axis = max(divisible, key=lambda i: (shape[i], -i))
    return [axes if i == axis else None for i in range(len(shape))]


def _check_expert_leaf(path, leaf, n: int) -> None:
    """Raises unless an expert param's leading (expert) axis splits over n devices."""
    if np.ndim(leaf) < 1 or np.shape(leaf)[0] % n:
        name = "/".join(_path_keys(path))
        num_experts = np.shape(leaf)[0] if np.ndim(leaf) else None
        raise ValueError(
            f"num_experts={num_experts} of {name} is not divisible by the 'expert' "
            f"mesh axis of size {n}; allowed: a multiple of {n} experts"
        )


@dataclasses.dataclass(frozen=True)
class DataParallel(_Strategy):
    """Params replicated on every device; the batch split over the one mesh axis 'data'; each
    device routes its own groups and runs every expert on them (`PerShardExchange`)."""

    name: ClassVar[str] = "data"
    batch_axes: ClassVar[tuple[str, ...]] = ("data",)

    mesh: Mesh

    @classmethod
    def create(
        cls, mesh_shape: Sequence[int] | None = None, devices: Sequence[Any] | None = None
    ) -> DataParallel:
        """mesh_shape = (data,); default (number of devices,)."""
        return cls(_strategy_mesh("data", ("data",), mesh_shape, devices))

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
        return cls(_strategy_mesh("expert", ("data", "expert"), mesh_shape, devices))

    @property
    def exchange(self) -> AllToAllExchange:
        return AllToAllExchange(self.mesh, "expert", self.batch_axes)

    def param_spec(self, path, leaf) -> PartitionSpec:
        if not is_expert_param(path):
            return PartitionSpec()
        _check_expert_leaf(path, leaf, self.mesh.shape["expert"])
        return PartitionSpec("expert")


class _SplitsParams(_Strategy):
    """What the fully-sharded built-ins share: a (data, <second axis>) mesh and `min_size`."""

    name: ClassVar[str]
    min_size: int

    @classmethod
    def create(
        cls,
        mesh_shape: Sequence[int] | None = None,
        devices: Sequence[Any] | None = None,
        min_size: int = 1024,
    ):
        """mesh_shape = (data, second axis); default (1, number of devices)."""
        min_size = check_int("min_size", min_size, low=0)  # a plain int: a static field
        return cls(_strategy_mesh(cls.name, cls.batch_axes, mesh_shape, devices), min_size)


@dataclasses.dataclass(frozen=True)
class FullySharded(_SplitsParams):
    """Every parameter of at least `min_size` elements split over 'fsdp' (largest divisible
    dimension); the batch split over ('data', 'fsdp'). XLA gathers params where they are used;
    each device routes its own groups and runs every expert on them (`PerShardExchange`).
    `create(mesh_shape=(data, fsdp), devices=None, min_size=1024)`."""

    name: ClassVar[str] = "fsdp"
    batch_axes: ClassVar[tuple[str, ...]] = ("data", "fsdp")

    mesh: Mesh
    min_size: int = 1024

    def param_spec(self, path, leaf) -> PartitionSpec:
        shape = np.shape(leaf)
        return PartitionSpec(*_split_largest(shape, self.mesh.shape["fsdp"], "fsdp", self.min_size))


@dataclasses.dataclass(frozen=True)
class ExpertFullySharded(_SplitsParams):
    """Experts split over 'expert' and every other parameter split over all devices: the layout
    a V-MoE too big for one device's memory needs.
    `create(mesh_shape=(data, expert), devices=None, min_size=1024)`.

    Mesh ('data', 'expert') of shape (D, X), the batch split over both axes, tokens reach their
    experts by all-to-all over 'expert' (as `ExpertParallel`; each device routes its own
    groups). Expert params: leading axis over 'expert', and, when at least `min_size` elements,
    their largest other divisible dimension over 'data' (gathered over 'data' where the layer
    uses them). Every other param of at least `min_size` elements: its largest dimension
    divisible by D*X split over ('data', 'expert'), else its largest divisible by D over
    'data', else replicated. XLA gathers them where they are used and brings their gradients
    back to the shards (on XLA:CPU as an all-reduce, see benchmarks/README.md).
    """

    name: ClassVar[str] = "expert_fsdp"
    batch_axes: ClassVar[tuple[str, ...]] = ("data", "expert")

    mesh: Mesh
    min_size: int = 1024

    @property
    def exchange(self) -> AllToAllExchange:
        return AllToAllExchange(self.mesh, "expert", self.batch_axes)

    def param_spec(self, path, leaf) -> PartitionSpec:
        shape = np.shape(leaf)
        data = self.mesh.shape["data"]
        if is_expert_param(path):
            _check_expert_leaf(path, leaf, self.mesh.shape["expert"])
            rest = _split_largest(shape, data, "data", self.min_size, skip=1)
            return PartitionSpec("expert", *rest[1:])
        entries = _split_largest(shape, self.mesh.size, self.batch_axes, self.min_size)
        return PartitionSpec(*(entries or _split_largest(shape, data, "data", self.min_size)))


STRATEGIES: Registry[ShardingStrategy] = Registry(
    "vmoe_sharding_strategies",
    "sharding strategy",
    members=("mesh", "param_specs", "batch_spec", "exchange"),
)


def get_strategy(name: str, **options: Any) -> ShardingStrategy:
    """The sharding strategy registered as `name`, built with `options` (e.g. mesh_shape)."""
    return STRATEGIES.create(name, **options)


def available_strategies() -> list[str]:
    """Names of every installed sharding strategy (built-ins and plugins), sorted."""
    return STRATEGIES.names()
