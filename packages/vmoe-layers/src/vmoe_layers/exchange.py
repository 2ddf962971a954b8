"""Expert exchange: how dispatched buffers reach the experts and come back.

The MoE layer turns tokens into per-expert buffers `x_gecd` [G, E, C, D] and hands them, with the
stacked expert params and the expert type, to an exchange, which returns `y_gecd` of the same
shape. Two exchanges:

- `run_local_experts` (the default): every device that holds buffers also holds (or is given, by
  the XLA partitioner) all E experts. Used on one device and by the data / fsdp strategies.
- `AllToAllExchange`: experts are split over a mesh axis (E/n per device) and the buffers travel
  there and back with two all-to-alls inside `jax.shard_map`, as in the original V-MoE. Used by
  the expert strategy.

Shape legend: G groups, E experts, C capacity, D model dim, T = G*C tokens per expert.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Protocol

import jax
from jax.sharding import Mesh, PartitionSpec

Array = jax.Array
ExpertFn = Callable[[Mapping[str, Array], Array], Array]  # (params_e..., x_etd) -> y_etd


class ExpertExchange(Protocol):
    """Runs `expert_fn(params, x_etd)` on buffers x [G, E, C, D]; returns y [G, E, C, D]."""

    def __call__(
        self, expert_fn: ExpertFn, params: Mapping[str, Array], x_gecd: Array
    ) -> Array: ...


def run_local_experts(expert_fn: ExpertFn, params: Mapping[str, Array], x_gecd: Array) -> Array:
    """All experts where the buffers are: [G, E, C, D] -> [E, G*C, D] -> experts -> back."""
    g, e, c, d = x_gecd.shape
    x_etd = x_gecd.transpose(1, 0, 2, 3).reshape(e, g * c, d)
    y_etd = expert_fn(params, x_etd)
    return y_etd.reshape(e, g, c, -1).transpose(1, 0, 2, 3)


@dataclasses.dataclass(frozen=True)
class AllToAllExchange:
    """Experts split over `expert_axis` of `mesh`; groups split over `batch_axes`.

    Inside `shard_map` each device holds G/B groups (B = product of the batch axes' sizes) of
    buffers for all E experts, and E/n experts (n = size of the expert axis). One all-to-all over
    the expert axis sends each device the buffers of its own experts from the n devices of its
    expert row ([G/B, E, C, D] -> [n*G/B, E/n, C, D]); the experts run locally; a second
    all-to-all brings the outputs back to where their tokens live.
    """

    mesh: Mesh
    expert_axis: str = "expert"
    batch_axes: tuple[str, ...] = ("data", "expert")

    def __post_init__(self) -> None:
        for axis in (self.expert_axis, *self.batch_axes):
            if axis not in self.mesh.shape:
                raise ValueError(
                    f"mesh axis {axis!r} is not in the mesh; its axes: {tuple(self.mesh.shape)}"
                )

    @property
    def num_expert_shards(self) -> int:
        return self.mesh.shape[self.expert_axis]

    @property
    def num_batch_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    def __call__(self, expert_fn: ExpertFn, params: Mapping[str, Array], x_gecd: Array) -> Array:
        g, e = x_gecd.shape[:2]
        n, b = self.num_expert_shards, self.num_batch_shards
        if e % n:
            raise ValueError(
                f"num_experts={e} is not divisible by the {self.expert_axis!r} mesh axis of size "
                f"{n}; allowed: num_experts a multiple of {n}"
            )
        if g % b:
            raise ValueError(
                f"the batch makes {g} routing groups, not divisible by the {b} devices of the "
                f"batch axes {self.batch_axes}; allowed: a number of groups that is a multiple "
                f"of {b}"
            )
        axis = self.expert_axis

        def on_device(params_local, x_local_gecd):
            x_here = jax.lax.all_to_all(x_local_gecd, axis, split_axis=1, concat_axis=0, tiled=True)
            y_here = run_local_experts(expert_fn, params_local, x_here)
            return jax.lax.all_to_all(y_here, axis, split_axis=0, concat_axis=1, tiled=True)

        param_specs = jax.tree.map(lambda _: PartitionSpec(axis), params)
        batch_spec = PartitionSpec(self.batch_axes)
        return jax.shard_map(
            on_device,
            mesh=self.mesh,
            in_specs=(param_specs, batch_spec),
            out_specs=batch_spec,
        )(params, x_gecd)


def exchange_or_local(exchange: ExpertExchange | None) -> ExpertExchange:
    return run_local_experts if exchange is None else exchange
