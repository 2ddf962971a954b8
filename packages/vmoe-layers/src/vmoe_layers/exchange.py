"""Expert exchange: where a MoE layer routes its groups and how buffers reach the experts.

The MoE layer hands its exchange one function, `moe_fn`, that routes groups of tokens, turns them
into per-expert buffers, runs the experts through a given `run_experts` and combines the
outputs, and the arrays it needs (router params, stacked expert params, tokens x [G, S, D], one
gating key per group or None). The router's inputs are one pytree that every device gets whole:
`MoeLayer` passes (router params, router state or None). The exchange decides where that runs:

- `run_local` (the default, no mesh): once, over every group, with `run_local_experts` (all E
  experts where the buffers are). Used on one device.
- `PerShardExchange`: inside `jax.shard_map`, each device routes *its own* groups and runs every
  expert on them; the expert params enter replicated (under fsdp XLA gathers them where the layer
  uses them, and reduces their gradients back to the shards), so nothing of the routing ([G, S,
  E] gates, [G, E, C, D] buffers, a dropless sort) crosses devices. Used by the data and fsdp
  strategies.
- `AllToAllExchange`: inside `jax.shard_map`, each device routes its own groups (gate, top-K,
  priorities, capacity, aux losses) and only the dispatched buffers travel, to the devices
  holding their experts and back, with two all-to-alls as in the original V-MoE. Used by the
  expert and expert_fsdp strategies.

Both sharded exchanges combine the per-device aux losses and metrics (means over groups) exactly
with `vmoe_routing.combine_over_shards`.

Shape legend: G groups, S group size, E experts, C capacity, D model dim, T = G*C tokens per
expert.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
from jax.sharding import Mesh, PartitionSpec

import vmoe_routing

Array = jax.Array
ExpertFn = Callable[[Mapping[str, Array], Array], Array]  # (params_e..., x_etd) -> y_etd
# run_experts(expert_fn, expert_params, x_gecd) -> y_gecd: how buffers meet their experts.
RunExperts = Callable[[ExpertFn, Mapping[str, Array], Array], Array]
# moe_fn(router_params, expert_params, x_gsd, keys_g, run_experts) -> (y_gsd, stats), where
# stats is a pytree of group means (aux losses, metrics), and router_params any pytree of the
# router's inputs (MoeLayer: its params and state), replicated on every device.
MoeFn = Callable[[Any, Mapping[str, Array], Array, Array | None, RunExperts], tuple[Array, Any]]


class ExpertExchange(Protocol):
    """Runs a MoE layer's `moe_fn` over the groups of x [G, S, D]; returns (y [G, S, D], stats)
    with stats the batch's aux losses and metrics (as if every group was routed at once)."""

    def __call__(
        self,
        moe_fn: MoeFn,
        router_params: Any,
        expert_params: Mapping[str, Array],
        x_gsd: Array,
        keys_g: Array | None,
    ) -> tuple[Array, Any]: ...


def run_local_experts(expert_fn: ExpertFn, params: Mapping[str, Array], x_gecd: Array) -> Array:
    """All experts where the buffers are: [G, E, C, D] -> [E, G*C, D] -> experts -> back."""
    g, e, c, d = x_gecd.shape
    x_etd = x_gecd.transpose(1, 0, 2, 3).reshape(e, g * c, d)
    y_etd = expert_fn(params, x_etd)
    return y_etd.reshape(e, g, c, -1).transpose(1, 0, 2, 3)


def run_local(
    moe_fn: MoeFn,
    router_params: Any,
    expert_params: Mapping[str, Array],
    x_gsd: Array,
    keys_g: Array | None,
) -> tuple[Array, Any]:
    """The default exchange: every group routed at once, all experts where the buffers are."""
    return moe_fn(router_params, expert_params, x_gsd, keys_g, run_local_experts)


class _ShardMapExchange:
    """What both sharded exchanges share: groups split over `batch_axes` of `mesh`, `moe_fn` run
    per device inside `jax.shard_map`, its statistics combined over the batch axes. Subclasses
    say how the expert params enter (`expert_spec`) and how buffers meet them (`run_experts`)."""

    mesh: Mesh
    batch_axes: tuple[str, ...]

    def _check_axes(self, *axes: str) -> None:
        for axis in axes:
            if axis not in self.mesh.shape:
                raise ValueError(
                    f"mesh axis {axis!r} is not in the mesh; its axes: {tuple(self.mesh.shape)}"
                )

    @property
    def num_batch_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    def expert_spec(self) -> PartitionSpec:
        raise NotImplementedError

    def run_experts(
        self, expert_fn: ExpertFn, params_local: Mapping[str, Array], x_local_gecd: Array
    ) -> Array:
        raise NotImplementedError

    def _check_experts(self, expert_params: Mapping[str, Array]) -> None:
        """Raises if the expert params cannot enter `shard_map` as `expert_spec` says."""

    def __call__(
        self,
        moe_fn: MoeFn,
        router_params: Any,
        expert_params: Mapping[str, Array],
        x_gsd: Array,
        keys_g: Array | None,
    ) -> tuple[Array, Any]:
        self._check_experts(expert_params)
        g, b = x_gsd.shape[0], self.num_batch_shards
        if g % b and self.run_experts is run_local_experts:
            # Groups straddle devices (e.g. an evaluation batch) and every expert is on every
            # device: one program over every group, the XLA partitioner moving what it must.
            # The same result, with more traffic.
            return run_local(moe_fn, router_params, expert_params, x_gsd, keys_g)
        if g % b:
            raise ValueError(
                f"the batch makes {g} routing groups, not divisible by the {b} devices of the "
                f"batch axes {self.batch_axes}; allowed: a number of groups that is a multiple "
                f"of {b} (each device routes whole groups of its own tokens)"
            )

        def on_device(router_params, expert_params, x_gsd, keys_g):
            y_gsd, stats = moe_fn(router_params, expert_params, x_gsd, keys_g, self.run_experts)
            return y_gsd, vmoe_routing.combine_over_shards(stats, self.batch_axes)

        batch = PartitionSpec(self.batch_axes)
        in_specs = (
            jax.tree.map(lambda _: PartitionSpec(), router_params),
            jax.tree.map(lambda _: self.expert_spec(), expert_params),
            batch,
            batch,
        )
        return jax.shard_map(
            on_device, mesh=self.mesh, in_specs=in_specs, out_specs=(batch, PartitionSpec())
        )(router_params, expert_params, x_gsd, keys_g)


@dataclasses.dataclass(frozen=True)
class PerShardExchange(_ShardMapExchange):
    """Groups split over `batch_axes` of `mesh`; every expert on every device.

    Inside `shard_map` each device routes its G/B groups (B = product of the batch axes' sizes),
    dispatches them into buffers [G/B, E, C, D] (or a dropless router's blocks, sorted among its
    own groups) and runs all E experts on them, with the expert params replicated: a strategy
    that shards them (fsdp) has XLA gather them before the layer and reduce their gradients
    after it. The only collectives are those of the params and the combined statistics
    (scalars and [E] vectors); no routing array or expert buffer crosses devices.

    A batch whose groups do not split evenly over the devices (e.g. an evaluation batch of 25
    groups on 2 devices) is routed as one program over every group instead, as without an
    exchange: the same result, with the XLA partitioner moving what it must.
    """

    mesh: Mesh
    batch_axes: tuple[str, ...] = ("data",)

    def __post_init__(self) -> None:
        self._check_axes(*self.batch_axes)

    def expert_spec(self) -> PartitionSpec:
        return PartitionSpec()

    # The very function the default exchange uses: the MoE layer knows from it that the experts
    # run where the tokens are (so routers without a capacity may run per device).
    run_experts = staticmethod(run_local_experts)


@dataclasses.dataclass(frozen=True)
class AllToAllExchange(_ShardMapExchange):
    """Experts split over `expert_axis` of `mesh`; groups split over `batch_axes`.

    Inside `shard_map` each device routes its G/B groups (B = product of the batch axes' sizes)
    and dispatches them into buffers [G/B, E, C, D] for all E experts; it holds E/n experts (n =
    size of the expert axis). One all-to-all over the expert axis sends each device the buffers
    of its own experts from the n devices of its expert row ([G/B, E, C, D] -> [n*G/B, E/n, C,
    D]); the experts run locally; a second all-to-all brings the outputs back to where their
    tokens live, where they are combined. Per device and MoE layer, the all-to-alls carry
    2 * (n-1)/n * G/B * E * C * D elements: constant when the batch per device is.

    Routers without a capacity (dropless: `vmoe_routing.BlockRouting`) are refused by the MoE
    layer: their per-expert blocks vary in number with the load, and an all-to-all moves
    buffers of one static shape.
    """

    mesh: Mesh
    expert_axis: str = "expert"
    batch_axes: tuple[str, ...] = ("data", "expert")

    def __post_init__(self) -> None:
        self._check_axes(self.expert_axis, *self.batch_axes)

    @property
    def num_expert_shards(self) -> int:
        return self.mesh.shape[self.expert_axis]

    def expert_spec(self) -> PartitionSpec:
        return PartitionSpec(self.expert_axis)

    def _check_experts(self, expert_params: Mapping[str, Array]) -> None:
        leaves = jax.tree.leaves(expert_params)
        if not leaves:
            raise ValueError(
                "AllToAllExchange needs expert params stacked along a leading expert axis; got "
                "an empty tree (an expert type without params cannot be split over devices)"
            )
        e, n = leaves[0].shape[0], self.num_expert_shards
        if e % n:
            raise ValueError(
                f"num_experts={e} is not divisible by the {self.expert_axis!r} mesh axis of size "
                f"{n}; allowed: num_experts a multiple of {n}"
            )

    def run_experts(
        self, expert_fn: ExpertFn, params_local: Mapping[str, Array], x_local_gecd: Array
    ) -> Array:
        """Inside `shard_map`: buffers [G/B, E, C, D] to their experts' devices and back."""
        axis = self.expert_axis
        x_here = jax.lax.all_to_all(x_local_gecd, axis, split_axis=1, concat_axis=0, tiled=True)
        y_here = run_local_experts(expert_fn, params_local, x_here)
        return jax.lax.all_to_all(y_here, axis, split_axis=0, concat_axis=1, tiled=True)


def exchange_or_local(exchange: ExpertExchange | None) -> ExpertExchange:
    return run_local if exchange is None else exchange
