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
        {} by default (the MoE layer adds the ones it can compute from the decision).
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
