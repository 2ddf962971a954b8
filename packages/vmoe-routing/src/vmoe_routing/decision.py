"""The routing decision: what a router hands to the code that moves tokens to experts.

Shape legend, used in every vmoe package:
  G groups, S tokens per group (group size), D model dim, E experts, C capacity (slots per
  expert per group), K choices per token, N assignments per group.

A router returns *what went where*, as indices, not one-hot tensors. Assignment n of group g
says: token `token[g, n]` goes to slot `slot[g, n]` of expert `expert[g, n]`, and that expert's
output comes back multiplied by `weight[g, n]`. Token-choice routers make N = S*K assignments;
expert-choice routers make N = E*C. Memory is O(G*N), never O(G*S*E*C).

Routers that mix every token into every slot (Soft MoE) use `DenseRouting` instead; it is also
the one-hot reference (`Routing.to_dense`) that tests check the index path against.

Routers without a capacity (dropless) use `BlockRouting`: the assignments of all groups, sorted
by expert into one flat buffer cut in blocks of `block_size` rows, each block holding one
expert's tokens. Memory is O(G*S*K + E*block_size) rows, whatever the load.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


def _register(cls: type, data: tuple[str, ...], meta: tuple[str, ...]) -> type:
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))


@dataclasses.dataclass(frozen=True)
class Routing:
    """An index-based routing decision for G groups (a pytree; the ints are static).

    Attributes:
      token: [G, N] int32, index into the S tokens of the group.
      expert: [G, N] int32, index into the E experts.
      slot: [G, N] int32, index into the expert's C buffer slots; equals `capacity` where the
        assignment is not valid, so it never aliases a real slot.
      weight: [G, N] float, combine weight; exactly 0 where not valid. Differentiable: gradients
        reach the router's gate through it.
      valid: [G, N] bool, False for choices dropped because the expert's buffer was full.
        Valid assignments of a group have distinct (expert, slot) pairs, and a token appears at
        most once per expert.
      group_size: S (static).
      num_experts: E (static).
      capacity: C (static).
      aux_loss: scalar, the weighted sum of the router's auxiliary losses (add it to the loss);
        0.0 for a router without any.
      aux_losses: unweighted auxiliary losses by name (scalars), for logging; {} by default.
      metrics: routing statistics by name, averaged over groups (see `token_choice_metrics`);
        names ending in `_max` / `_min` are maxima / minima over groups instead (how
        `combine_over_shards` joins the groups of several devices). {} by default (the MoE
        layer adds the ones it can compute from the decision).
    """

    token: Array
    expert: Array
    slot: Array
    weight: Array
    valid: Array
    group_size: int
    num_experts: int
    capacity: int
    aux_loss: Array | float = 0.0
    aux_losses: dict[str, Array] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Array] = dataclasses.field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return self.token.shape[0]

    def buffer_index(self) -> Array:
        """[G, N] flat index `expert * C + slot` into an [E*C] buffer; E*C where not valid."""
        flat = self.expert * self.capacity + self.slot
        return jnp.where(self.valid, flat, self.num_experts * self.capacity)

    def no_expert_fraction(self) -> Array:
        """Scalar: the fraction of the G*S tokens that no expert processes (every choice of the
        token was dropped). Their MoE output is 0: only the residual connection carries them."""
        g, s = self.num_groups, self.group_size
        kept_gs = (
            jnp.zeros((g, s), jnp.int32)
            .at[jnp.arange(g)[:, None], self.token]
            .add(self.valid.astype(jnp.int32))
        )
        return jnp.mean((kept_gs == 0).astype(jnp.float32))

    def to_dense(self) -> DenseRouting:
        """The same decision as one-hot [G, S, E, C] tensors (a slow, obvious reference)."""
        s, e, c = self.group_size, self.num_experts, self.capacity
        valid = self.valid.astype(self.weight.dtype)
        # One-hot of each index; out-of-range slots (invalid assignments) one-hot to all zeros.
        one_hots = (
            jax.nn.one_hot(self.token, s, dtype=self.weight.dtype),
            jax.nn.one_hot(self.expert, e, dtype=self.weight.dtype),
            jax.nn.one_hot(self.slot, c, dtype=self.weight.dtype),
        )
        dispatch = jnp.einsum("gn,gns,gne,gnc->gsec", valid, *one_hots)
        combine = jnp.einsum("gn,gns,gne,gnc->gsec", self.weight * valid, *one_hots)
        return DenseRouting(
            dispatch_weights=dispatch,
            combine_weights=combine,
            aux_loss=self.aux_loss,
            aux_losses=self.aux_losses,
            metrics=self.metrics,
        )


_register(
    Routing,
    ("token", "expert", "slot", "weight", "valid", "aux_loss", "aux_losses", "metrics"),
    ("group_size", "num_experts", "capacity"),
)


@dataclasses.dataclass(frozen=True)
class DenseRouting:
    """A dense routing decision: every token may feed every slot with a real-valued weight.

    Attributes:
      dispatch_weights: [G, S, E, C], buffer[g, e, c] = sum_s dispatch[g, s, e, c] * x[g, s].
      combine_weights: [G, S, E, C], out[g, s] = sum_{e, c} combine[g, s, e, c] * y[g, e, c].
      aux_loss, aux_losses, metrics: as in `Routing` (with the same defaults).
    """

    dispatch_weights: Array
    combine_weights: Array
    aux_loss: Array | float = 0.0
    aux_losses: dict[str, Array] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Array] = dataclasses.field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return self.dispatch_weights.shape[0]

    @property
    def group_size(self) -> int:
        return self.dispatch_weights.shape[1]

    @property
    def num_experts(self) -> int:
        return self.dispatch_weights.shape[2]

    @property
    def capacity(self) -> int:
        return self.dispatch_weights.shape[3]

    def no_expert_fraction(self) -> Array:
        """Scalar: the fraction of tokens with no dispatch weight into any slot."""
        reached_gs = jnp.any(self.dispatch_weights != 0, axis=(2, 3))
        return 1.0 - jnp.mean(reached_gs.astype(jnp.float32))


_register(
    DenseRouting,
    ("dispatch_weights", "combine_weights", "aux_loss", "aux_losses", "metrics"),
    (),
)


@dataclasses.dataclass(frozen=True)
class BlockRouting:
    """A capacity-free routing decision: every assignment kept, in expert-homogeneous blocks.

    The M assignments of all G groups (M = G*S*K for top-K) own distinct rows of one flat
    buffer of B*b rows (b = `block_size`); block j (rows j*b .. j*b+b-1) holds tokens of expert
    `block_expert[j]` only, padded with empty rows. The experts run on [B, b, D] blocks, each
    with its expert's parameters (`vmoe_layers.MoeLayer` gathers them per block), so no token is
    dropped at any load and memory is O(M + E*b) rows of D. Use it where experts run where the
    tokens are (one device, or the data / fsdp strategies); it has no per-expert buffers to send
    over an all-to-all.

    Attributes:
      token: [M] int32, flat token index g*S + s into the G*S tokens.
      row: [M] int32, the assignment's row in the [B*b] buffer (distinct per assignment).
      expert: [M] int32, the assignment's expert (that of the block holding its row).
      weight: [M] float, combine weight (differentiable: the router's gate learns through it).
      block_expert: [B] int32, the expert of each block (blocks past the used ones: any expert,
        their rows are empty).
      num_groups: G (static).
      group_size: S (static).
      num_experts: E (static).
      block_size: b (static).
      aux_loss, aux_losses, metrics: as in `Routing`.
    """

    token: Array
    row: Array
    expert: Array
    weight: Array
    block_expert: Array
    num_groups: int
    group_size: int
    num_experts: int
    block_size: int
    aux_loss: Array | float = 0.0
    aux_losses: dict[str, Array] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Array] = dataclasses.field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]

    def no_expert_fraction(self) -> Array:
        """Scalar: the fraction of the G*S tokens without any assignment (0 for top-K)."""
        g, s = self.num_groups, self.group_size
        seen = jnp.zeros((g * s,), bool).at[self.token].set(True)
        return 1.0 - jnp.mean(seen.astype(jnp.float32))

    def to_routing(self) -> Routing:
        """The same decision as a capacity `Routing` with C = S, N = M/G (a slow reference).

        Each group must hold the same number of assignments (true of top-K: S*K). Slots are
        ranks in buffer-row order within (group, expert)."""
        g, s, e = self.num_groups, self.group_size, self.num_experts
        by_group = jnp.argsort(self.token // s, stable=True)  # [M] -> groups of M/G
        token, expert = self.token[by_group], self.expert[by_group]
        row, weight = self.row[by_group], self.weight[by_group]
        n = token.shape[0] // g
        group = token // s
        # Rank of each assignment among the earlier rows of its (group, expert).
        pair = group * e + expert
        order = jnp.lexsort((row, pair))
        starts = jnp.searchsorted(pair[order], pair[order], side="left")
        slot = jnp.zeros_like(token).at[order].set(jnp.arange(token.shape[0]) - starts)
        return Routing(
            token=(token % s).reshape(g, n).astype(jnp.int32),
            expert=expert.reshape(g, n).astype(jnp.int32),
            slot=slot.reshape(g, n).astype(jnp.int32),
            weight=weight.reshape(g, n),
            valid=jnp.ones((g, n), bool),
            group_size=s,
            num_experts=e,
            capacity=s,
            aux_loss=self.aux_loss,
            aux_losses=self.aux_losses,
            metrics=self.metrics,
        )


_register(
    BlockRouting,
    ("token", "row", "expert", "weight", "block_expert", "aux_loss", "aux_losses", "metrics"),
    ("num_groups", "group_size", "num_experts", "block_size"),
)
