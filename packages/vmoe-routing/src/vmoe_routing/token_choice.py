"""Token-choice assignment: turn each token's K expert choices into buffer slots.

Every token-choice router (vanilla top-K, BPR, hash, ...) ends the same way: given each token's
K chosen experts and weights, fill the experts' buffers in a fixed order and drop what does not
fit. The order is *K-major*: every token's first choice is placed before any second choice (as
in V-MoE and GShard). Within one choice rank, tokens go in token order (vanilla) or by
descending priority (Batch Priority Routing), ties kept in token order.

A choice's slot is its rank among the earlier choices of the same expert, so it does not depend
on the capacity: a smaller capacity keeps a prefix of the same order (the kept sets are nested).
Slots are found with one stable sort of the N = S*K choices by expert: O(N log N) time and O(N)
memory, no [S, E] or [S, E, C] one-hot tensor.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vmoe_routing.decision import Routing

Array = jax.Array


def rank_within_expert(expert_n: Array, num_experts: int) -> Array:
    """[N] -> [N]: how many earlier entries of `expert_n` name the same expert."""
    n = expert_n.shape[0]
    order = jnp.argsort(expert_n, stable=True)
    counts = jnp.zeros((num_experts,), jnp.int32).at[expert_n].add(1)
    first = jnp.cumsum(counts) - counts  # first position of each expert in the sorted order
    rank_sorted = jnp.arange(n, dtype=jnp.int32) - first[expert_n[order]]
    return jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted)


def _assign_group(expert_sk, weight_sk, priority_s, num_experts, capacity):
    s, k = expert_sk.shape
    if priority_s is None:
        order_s = jnp.arange(s, dtype=jnp.int32)
    else:
        order_s = jnp.argsort(priority_s, descending=True, stable=True).astype(jnp.int32)
    # K-major processing order: n = k * S + rank.
    token = jnp.tile(order_s, k)
    expert = expert_sk[order_s].T.reshape(-1).astype(jnp.int32)
    weight = weight_sk[order_s].T.reshape(-1)
    slot = rank_within_expert(expert, num_experts)
    valid = slot < capacity
    return token, expert, jnp.where(valid, slot, capacity), jnp.where(valid, weight, 0), valid


def token_choice_metrics(routing: Routing) -> dict[str, Array]:
    """Routing statistics of token-choice assignments, averaged over groups.

    Returns a dict with:
      dropped_fraction: scalar, fraction of token-choices dropped for lack of capacity.
      no_expert_fraction: scalar, fraction of tokens that lost every choice (no expert at all);
        what Batch Priority Routing keeps low for the tokens that matter.
      expert_load: [E], fraction of the token-choices that chose each expert (sums to 1).
      expert_fill: [E], fraction of each expert's capacity that was used.
    """
    expert, valid, e = routing.expert, routing.valid, routing.num_experts
    g, n = expert.shape
    rows = jnp.arange(g)[:, None]
    chosen = jnp.zeros((g, e), jnp.float32).at[rows, expert].add(1.0)
    kept = jnp.zeros((g, e), jnp.float32).at[rows, expert].add(valid.astype(jnp.float32))
    return {
        "dropped_fraction": 1.0 - jnp.mean(valid.astype(jnp.float32)),
        "no_expert_fraction": routing.no_expert_fraction(),
        "expert_load": jnp.mean(chosen, axis=0) / n,
        "expert_fill": jnp.mean(kept, axis=0) / routing.capacity,
    }


def token_choice_routing(
    expert_gsk: Array,
    weight_gsk: Array,
    *,
    num_experts: int,
    capacity: int,
    priority_gs: Array | None = None,
    aux_loss: Array | float = 0.0,
    aux_losses: dict[str, Array] | None = None,
) -> Routing:
    """Builds a `Routing` from each token's K choices. The building block for token-choice routers.

    Args:
      expert_gsk: [G, S, K] int, the experts each token chose, best first. A token must not name
        one expert twice (jax.lax.top_k guarantees this).
      weight_gsk: [G, S, K] float, the combine weight of each choice.
      num_experts: E.
      capacity: C, slots per expert per group (see `compute_capacity`).
      priority_gs: [G, S] float or None. None fills buffers in token order (vanilla); otherwise
        higher priority tokens are placed first within each choice rank (BPR).
      aux_loss, aux_losses: carried into the result unchanged.

    Returns:
      A `Routing` with N = S*K assignments per group, in processing order.
    """
    if expert_gsk.ndim != 3 or weight_gsk.shape != expert_gsk.shape:
        raise ValueError(
            f"expert_gsk and weight_gsk must both have shape [G, S, K]; got "
            f"{expert_gsk.shape} and {weight_gsk.shape}"
        )
    if priority_gs is not None and priority_gs.shape != expert_gsk.shape[:2]:
        raise ValueError(
            f"priority_gs must have shape [G, S]={expert_gsk.shape[:2]}; got {priority_gs.shape}"
        )
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")

    def assign(expert_sk, weight_sk, priority_s):
        return _assign_group(expert_sk, weight_sk, priority_s, num_experts, capacity)

    in_axes = (0, 0, None if priority_gs is None else 0)
    token, expert, slot, weight, valid = jax.vmap(assign, in_axes)(
        expert_gsk, weight_gsk, priority_gs
    )
    routing = Routing(
        token=token,
        expert=expert,
        slot=slot,
        weight=weight,
        valid=valid,
        group_size=expert_gsk.shape[1],
        num_experts=num_experts,
        capacity=capacity,
        aux_loss=jnp.asarray(aux_loss, jnp.float32),
        aux_losses=dict(aux_losses or {}),
    )
    return dataclasses.replace(routing, metrics=token_choice_metrics(routing))
