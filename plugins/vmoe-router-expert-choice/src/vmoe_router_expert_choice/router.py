"""Expert-choice routing (Zhou et al., "Mixture-of-Experts with Expert Choice Routing", 2022).

Token choice lets every token pick its K experts and drops what overflows a buffer; expert choice
turns the selection around: every expert picks the C tokens of the group it scores highest, so
each buffer is exactly full (perfect load balance, no auxiliary loss) and a token may be picked
by any number of experts, from none to E.

    gates[g, s, e] = softmax_e(x[g, s] @ W)        (no noise, no bias)
    token[g, e, :] = the C tokens s with the largest gates[g, s, e], best first
    weight          = gates[g, token, e]          (the combine weight: the gate itself)

C follows the V-MoE capacity rule with K read as *the average number of experts per token*:
C = ceil(k * capacity_factor * S / E) (`vmoe_routing.compute_capacity`), so expert choice at
(k, capacity_factor) fills exactly the slots that top-K at the same (k, capacity_factor) has:
the same expert FLOPs, which is the comparison the paper makes.

Shape legend: G groups, S tokens per group, D model dim, E experts, C capacity, N = E*C.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

import vmoe_routing

Array = jax.Array


def expert_choice_metrics(routing: vmoe_routing.Routing) -> dict[str, Array]:
    """Routing statistics of an expert-choice decision, averaged over groups.

    Returns a dict with:
      experts_per_token: [E + 1], entry j is the fraction of tokens processed by exactly j
        experts (sums to 1). Expert choice spends more compute on some tokens than others.
      no_expert_fraction: scalar, entry 0 of `experts_per_token`: tokens no expert picked
        (only the residual connection carries them).
      mean_experts_per_token: scalar, C * E / S for a full decision.
      expert_load: [E], each expert's share of the processed token-slots (1/E by construction).
      expert_fill: [E], fraction of each expert's capacity used (1 by construction).
    """
    g, e, s = routing.num_groups, routing.num_experts, routing.group_size
    valid = routing.valid.astype(jnp.float32)
    rows = jnp.arange(g)[:, None]
    per_token_gs = jnp.zeros((g, s), jnp.float32).at[rows, routing.token].add(valid)
    histogram = jax.nn.one_hot(per_token_gs.astype(jnp.int32), e + 1, dtype=jnp.float32)
    per_expert_ge = jnp.zeros((g, e), jnp.float32).at[rows, routing.expert].add(valid)
    experts_per_token = jnp.mean(histogram, axis=(0, 1))
    return {
        "experts_per_token": experts_per_token,
        "no_expert_fraction": experts_per_token[0],
        "mean_experts_per_token": jnp.mean(per_token_gs),
        "expert_load": jnp.mean(per_expert_ge / jnp.sum(per_expert_ge, -1, keepdims=True), 0),
        "expert_fill": jnp.mean(per_expert_ge, axis=0) / routing.capacity,
    }


@dataclasses.dataclass(frozen=True)
class ExpertChoiceRouter(vmoe_routing.TokenChoiceRouter):
    """Each expert takes the C tokens of the group with its largest gate values.

    It reuses `vmoe_routing.TokenChoiceRouter` for its options and their checks only (K, the
    capacity factors, rounding, multiple-of, `replace`, `capacity`): the selection is its own.

    Attributes:
      num_experts: E.
      k: the average number of experts per token (the paper's capacity factor c), used only
        through the capacity C = ceil(k * capacity_factor * S / E); 1 <= k <= E.
      capacity_factor, eval_capacity_factor, capacity_rounding, capacity_multiple_of: as in
        `vmoe_routing.TokenChoiceRouter`; the capacity never exceeds S.
      gate_dtype: dtype of the gate matmul (the softmax runs in float32).
    """

    name: ClassVar[str] = "expert_choice"

    gate_dtype: Any = jnp.float32

    def init(self, rng: Array, d_model: int) -> dict[str, Array]:
        """{"gate": [D, E] float32}, LeCun-normal initialised."""
        init = jax.nn.initializers.lecun_normal()
        return {"gate": init(rng, (d_model, self.num_experts), jnp.float32)}

    def gates(self, params: dict[str, Array], x_gsd: Array) -> Array:
        """[G, S, E] float32: softmax over experts of x @ W."""
        logits = vmoe_routing.gate_logits(params["gate"], x_gsd, self.gate_dtype)
        return jax.nn.softmax(logits, axis=-1)

    def __call__(
        self,
        params: dict[str, Array],
        x_gsd: Array,
        *,
        rng: Array | None = None,
        deterministic: bool = True,
    ) -> vmoe_routing.Routing:
        del rng  # expert choice adds no gating noise
        gates_gse = self.gates(params, x_gsd)
        g, s, e = gates_gse.shape
        c = self.capacity(s, deterministic)
        # Each expert's C best tokens (ties: the lower token index first, as jax.lax.top_k does).
        weight_gec, token_gec = jax.lax.top_k(jnp.swapaxes(gates_gse, 1, 2), c)
        routing = vmoe_routing.Routing(
            token=token_gec.reshape(g, e * c).astype(jnp.int32),
            expert=jnp.broadcast_to(jnp.repeat(jnp.arange(e, dtype=jnp.int32), c), (g, e * c)),
            slot=jnp.broadcast_to(jnp.tile(jnp.arange(c, dtype=jnp.int32), e), (g, e * c)),
            weight=weight_gec.reshape(g, e * c),
            valid=jnp.ones((g, e * c), bool),
            group_size=s,
            num_experts=e,
            capacity=c,
            aux_loss=jnp.float32(0.0),
        )
        return dataclasses.replace(routing, metrics=expert_choice_metrics(routing))
