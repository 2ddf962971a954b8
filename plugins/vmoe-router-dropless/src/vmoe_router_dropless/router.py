"""Dropless top-K routing: every token reaches its K experts at any load.

Token-choice top-K with a capacity drops the choices that overflow an expert's buffer; making
the buffers large enough for any load (C = S) costs O(G*E*S*D) memory. Dropless routing keeps
the top-K gating of `vmoe_routing.TopKRouter` (same gates, noise, auxiliary losses) and places
the choices without a capacity: the M = G*S*K choices of all groups are sorted by expert into
one flat buffer cut in blocks of b rows, each expert's run padded to whole blocks
(`block_layout`). The experts then run on [B, b, D] blocks, block j with the parameters of
expert `block_expert[j]` (`vmoe_routing.BlockRouting`, run by `vmoe_layers.MoeLayer`).

Memory: B <= M/b + E blocks, so activations are O((M + E*b) * D) = O(tokens * K * D) for
b*E <= M, whatever the load; the per-block copies of the expert parameters are O((M/b + E) * P)
for P parameters per expert, which is what `block_size` trades against padding.

Why blocks and not `jax.lax.ragged_dot` (a grouped matmul over the sorted rows): on XLA:CPU
ragged_dot is lowered to a dense dot masked per group, E times the FLOPs; blocks keep the work at
(M + padding) rows of batched matmuls with any expert type, not only those written with
ragged_dot (benchmarks/README.md has the measurements).

Shape legend: G groups, S tokens per group, D model dim, E experts, K choices per token,
M = G*S*K choices, b block size, B blocks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

import vmoe_plugins
import vmoe_routing

Array = jax.Array


def block_layout(expert_m: Array, num_experts: int, block_size: int) -> tuple[Array, Array]:
    """Rows for M choices in expert-homogeneous blocks of `block_size` rows.

    Expert e's choices fill ceil(n_e / b) consecutive blocks, in the order they come in
    `expert_m` (one stable sort, `vmoe_routing.rank_within_expert`); experts follow one another
    in id order. B = ceil((M + E*(b-1)) / b) blocks always suffice.

    Returns:
      row_m: [M] int32, each choice's row in the [B*b] buffer (distinct).
      block_expert: [B] int32, the expert of each block (unused trailing blocks: E-1).
    """
    m, e, b = expert_m.shape[0], num_experts, block_size
    num_blocks = math.ceil((m + e * (b - 1)) / b)
    counts = jnp.zeros((e,), jnp.int32).at[expert_m].add(1)
    blocks_e = (counts + b - 1) // b
    end_e = jnp.cumsum(blocks_e)
    start_e = end_e - blocks_e
    rank_m = vmoe_routing.rank_within_expert(expert_m, e)
    row_m = start_e[expert_m] * b + rank_m
    block_expert = jnp.searchsorted(end_e, jnp.arange(num_blocks), side="right")
    return row_m.astype(jnp.int32), jnp.minimum(block_expert, e - 1).astype(jnp.int32)


def dropless_metrics(routing: vmoe_routing.BlockRouting) -> dict[str, Array]:
    """Routing statistics of a dropless decision: means over groups, as every router's (so a
    sharded exchange's per-device statistics combine into the batch's), except the layout's
    padding.

    Returns a dict with:
      dropped_fraction, no_expert_fraction: scalars, 0 by construction (kept for dashboards
        that compare routers).
      expert_load: [E], each expert's share of a group's S*K choices, averaged over groups
        (sums to 1; equal groups make it the share of all M choices).
      max_load_ratio: scalar, per group the busiest expert's choices over the balanced share
        S*K/E, averaged over groups: the capacity factor a capacity router would need for the
        average group to drop nothing.
      padding_fraction: scalar, the share of the B*b buffer rows left empty: a property of the
        layout, which depends on where the sort ran (one device: all groups; under a sharded
        exchange: each device's groups, this being the mean over devices).
    """
    e, g, s = routing.num_experts, routing.num_groups, routing.group_size
    m = routing.token.shape[0]
    choices_per_group = m // g  # S*K
    counts_ge = jnp.zeros((g, e), jnp.float32).at[routing.token // s, routing.expert].add(1.0)
    load_ge = counts_ge / choices_per_group
    return {
        "dropped_fraction": jnp.float32(0.0),
        "no_expert_fraction": routing.no_expert_fraction(),
        "expert_load": jnp.mean(load_ge, axis=0),
        "max_load_ratio": jnp.mean(jnp.max(load_ge, axis=1)) * e,
        "padding_fraction": jnp.float32(1.0 - m / (routing.num_blocks * routing.block_size)),
    }


_GATING_FIELDS = (
    "num_experts",
    "k",
    "noise_std",
    "gate_dtype",
    "importance_loss_weight",
    "load_loss_weight",
    "gshard_loss_weight",
    "z_loss_weight",
    "normalize_weights",
)


@dataclasses.dataclass(frozen=True)
class DroplessRouter:
    """Top-K gating as `vmoe_routing.TopKRouter`, every choice kept (no capacity).

    Attributes:
      num_experts: E.
      k: experts per token, 1 <= k <= E.
      noise_std, gate_dtype, importance_loss_weight, load_loss_weight, gshard_loss_weight,
        z_loss_weight, normalize_weights: the gating, its auxiliary losses and combine weights,
        as in `vmoe_routing.TopKRouter` (which computes them: this router holds one). Nothing
        is dropped here, so with normalize_weights every token's weights sum to 1.
      block_size: b, rows per expert block; padding is at most E*(b-1) rows, the per-block
        parameter copies B <= M/b + E.
    """

    name: ClassVar[str] = "dropless"

    num_experts: int
    k: int = 1
    noise_std: float = 1.0
    gate_dtype: Any = jnp.float32
    importance_loss_weight: float = 0.005
    load_loss_weight: float = 0.005
    gshard_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    normalize_weights: bool = False
    block_size: int = 128

    def __post_init__(self) -> None:
        gating = self.gating  # checks every gating option, with the built-ins' messages
        for field in _GATING_FIELDS:  # as the check normalised them (plain ints, floats)
            object.__setattr__(self, field, getattr(gating, field))
        block_size = vmoe_plugins.check_int("block_size", self.block_size, low=1)
        object.__setattr__(self, "block_size", block_size)

    @property
    def gating(self) -> vmoe_routing.TopKRouter:
        """The TopKRouter whose `choose` picks the experts (capacity options unused)."""
        return vmoe_routing.TopKRouter(**{f: getattr(self, f) for f in _GATING_FIELDS})

    def replace(self, **changes: Any) -> DroplessRouter:
        """A copy with some options changed (validated), e.g. `router.replace(k=1)`."""
        return dataclasses.replace(self, **changes)

    def init(self, rng: Array, d_model: int) -> dict[str, Array]:
        """{"gate": [D, E] float32}, as `vmoe_routing.TopKRouter.init`."""
        return self.gating.init(rng, d_model)

    def __call__(
        self,
        params: dict[str, Array],
        x_gsd: Array,
        *,
        rng: Array | None = None,
        deterministic: bool = True,
    ) -> vmoe_routing.BlockRouting:
        expert_gsk, weight_gsk, aux_loss, aux = self.gating.choose(
            params, x_gsd, rng=rng, deterministic=deterministic
        )
        g, s, k = expert_gsk.shape
        token_m = jnp.repeat(jnp.arange(g * s, dtype=jnp.int32), k)  # [M], choices of a token
        expert_m = expert_gsk.reshape(-1)
        row_m, block_expert = block_layout(expert_m, self.num_experts, self.block_size)
        routing = vmoe_routing.BlockRouting(
            token=token_m,
            row=row_m,
            expert=expert_m,
            weight=self.gating.combine_weights(weight_gsk).reshape(-1),
            block_expert=block_expert,
            num_groups=g,
            group_size=s,
            num_experts=self.num_experts,
            block_size=self.block_size,
            aux_loss=aux_loss,
            aux_losses=aux,
        )
        return dataclasses.replace(routing, metrics=dropless_metrics(routing))
