"""Group-limited top-K routing (DeepSeek-V3, Section 2.1.2 "node-limited routing"; its
`n_group` / `topk_group`; DeepSeek-V2's "device-limited routing").

The E experts are split into P contiguous groups of E/P experts (group p holds experts
p*E/P ... (p+1)*E/P - 1). Each token scores every group from its gates, keeps its best T
groups, and picks its top-K experts among the experts of those groups only:

    gates [G, S, E]     = softmax(x W)                 (+ noise_std / E noise, in training)
    score [G, S, P]     = per group of E/P gates: "top2_sum", the sum of its two largest
                          (DeepSeek-V3), or "max", its largest (DeepSeek-V2)
    kept  [G, S, T]     = top-T groups by score
    experts [G, S, K]   = top-K of the gates, those outside the kept groups masked out
    weights [G, S, K]   = the (unmasked) gates of those experts (`normalize_weights` as top_k)

Everything after the choice (capacity, K-major buffer filling in token or priority order, aux
losses) is `vmoe_routing.TopKRouter`'s. Why: the "expert" sharding strategy lays the experts out
contiguously, E/n per device on n expert shards, so with P = n (or a multiple of n) groups a
token's experts lie on at most T devices.

Shape legend: G groups (of tokens), S tokens per group, D model dim, E experts, K choices per
token, P expert groups (`num_expert_groups`) of E/P experts, T kept expert groups per token
(`topk_groups`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

import vmoe_plugins
import vmoe_routing

Array = jax.Array
GROUP_SCORES = ("top2_sum", "max")
PRIORITIES = (None, "max", "sum")


def group_scores(gates_gse: Array, num_expert_groups: int, group_score: str) -> Array:
    """[G, S, E] -> [G, S, P]: each expert group's score for each token.

    "top2_sum": the sum of the group's two largest gates (its only gate in groups of one
    expert); "max": its largest gate.
    """
    vmoe_plugins.check_choice("group_score", group_score, GROUP_SCORES)
    *lead, e = gates_gse.shape
    by_group = gates_gse.reshape(*lead, num_expert_groups, e // num_expert_groups)
    if group_score == "max":
        return jnp.max(by_group, axis=-1)
    top, _ = jax.lax.top_k(by_group, min(2, by_group.shape[-1]))
    return jnp.sum(top, axis=-1)


def kept_experts(gates_gse: Array, num_expert_groups: int, topk_groups: int, group_score: str):
    """[G, S, E] bool: the experts of each token's `topk_groups` best groups (ties between
    group scores: the lower group, as jax.lax.top_k)."""
    score_gsp = group_scores(gates_gse, num_expert_groups, group_score)
    _, kept_gst = jax.lax.top_k(score_gsp, topk_groups)
    kept_gsp = jnp.any(kept_gst[..., None] == jnp.arange(num_expert_groups), axis=-2)
    return jnp.repeat(kept_gsp, gates_gse.shape[-1] // num_expert_groups, axis=-1)


@dataclasses.dataclass(frozen=True)
class GroupLimitedRouter(vmoe_routing.TopKRouter):
    """Top-K routing restricted, per token, to the experts of its best `topk_groups` groups.

    Attributes (besides `vmoe_routing.TopKRouter`'s num_experts, k, capacity options,
    noise_std, gate_dtype, normalize_weights and the loss weights):
      num_expert_groups: P, the number of contiguous expert groups; must divide num_experts.
        1 (default) is plain top_k.
      topk_groups: T, the groups each token keeps, 1 <= T <= P; k <= T * E / P.
      group_score: how a token scores a group from its gates: "top2_sum" (the sum of the
        group's two largest gates, DeepSeek-V3; default) or "max" (its largest, DeepSeek-V2).
      priority_score: None (buffers filled in token order, as top_k) or, as bpr's, "max" /
        "sum" (Batch Priority Routing by the largest / the sum of the token's chosen gates).
      load_loss_weight: 0 by default; > 0 only when no group is left out (T = P): the load
        loss models an unrestricted top-K of the noisy logits, and this router's is restricted.
    """

    name: ClassVar[str] = "group_limited"

    num_expert_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"
    priority_score: str | None = None
    load_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        e, k = self.num_experts, self.k
        p = vmoe_plugins.check_int("num_expert_groups", self.num_expert_groups, low=1)
        if e % p:
            divisors = [d for d in range(1, e + 1) if e % d == 0]
            raise ValueError(
                f"num_expert_groups={p} must divide num_experts={e} (groups of equal size); "
                f"allowed: one of {divisors}"
            )
        t = self.topk_groups
        if not (vmoe_plugins.is_int(t) and 1 <= t <= p):
            raise ValueError(f"topk_groups={t!r} must be an integer in [1, num_expert_groups={p}]")
        t = int(t)
        if k > t * (e // p):
            raise ValueError(
                f"k={k} must be <= topk_groups * experts per group = {t} * {e // p} = "
                f"{t * (e // p)} (num_experts={e}, num_expert_groups={p}): a token picks its "
                "k experts among the experts of its kept groups"
            )
        vmoe_plugins.check_choice("group_score", self.group_score, GROUP_SCORES)
        vmoe_plugins.check_choice("priority_score", self.priority_score, PRIORITIES)
        if self.load_loss_weight > 0 and t < p:
            raise ValueError(
                f"load_loss_weight={self.load_loss_weight} is not available with router "
                f"'group_limited' when topk_groups={t} < num_expert_groups={p}: the load loss "
                "models an unrestricted top-K of the noisy logits, and this router picks among "
                "the kept groups' experts only; allowed: 0 (balance with importance_loss_weight "
                "or gshard_loss_weight), or topk_groups=num_expert_groups (no restriction)"
            )
        # Plain ints, so that equal routers hash equal (they are static arguments under jit).
        object.__setattr__(self, "num_expert_groups", p)
        object.__setattr__(self, "topk_groups", t)

    def choose(
        self,
        params: dict[str, Array],
        x_gsd: Array,
        *,
        rng: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, Array, Array, dict[str, Array]]:
        """Each token's K choices before any capacity, as `TopKRouter.choose`: (expert_gsk
        [G, S, K] int32, the top-K gates among the kept groups' experts, best first;
        weight_gsk [G, S, K] their gates; aux_loss; aux_losses)."""
        logits, noisy_logits, gates = self.gate(params, x_gsd, rng=rng, deterministic=deterministic)
        expert_gsk = self.select(gates)
        weight_gsk = jnp.take_along_axis(gates, expert_gsk, axis=-1)
        aux_loss, aux = self.aux_losses(logits, noisy_logits, gates, expert_gsk)
        return expert_gsk, weight_gsk, aux_loss, aux

    def select(self, gates_gse: Array) -> Array:
        """[G, S, E] gates -> [G, S, K] int32 experts: the top-K gates of the experts of each
        token's kept groups, best first (ties: the lower expert, as jax.lax.top_k). No
        gradient: the weights, gathered from the gates, carry it."""
        gates = jax.lax.stop_gradient(gates_gse)
        kept_gse = kept_experts(gates, self.num_expert_groups, self.topk_groups, self.group_score)
        # Gates are in [0, 1]; -inf never wins, and k <= T * E / P experts are kept.
        _, expert_gsk = jax.lax.top_k(jnp.where(kept_gse, gates, -jnp.inf), self.k)
        return expert_gsk.astype(jnp.int32)

    def priority(self, weight_gsk: Array) -> Array | None:
        """[G, S] buffer-filling priority from the chosen experts' gates, or None."""
        if self.priority_score is None:
            return None
        if self.priority_score == "max":
            return jnp.max(weight_gsk, axis=-1)
        return jnp.sum(weight_gsk, axis=-1)
