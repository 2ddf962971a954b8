"""Auxiliary-loss-free load balancing (DeepSeek-V3, Section 2.1.2; Wang et al. 2024,
"Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").

Top-K token choice in which every expert e carries a bias b_e that is added to the scores used
to *select* experts, never to the combine weights, and that is nudged towards balance after each
training step by the load it observed, outside the gradient (MaxText calls it `routed_bias`):

    gates [G, S, E] = softmax(x W)              (+ noise_std / E noise on the logits in training)
    experts         = top-K of (gates + b)      selection: biased
    weights         = gates at those experts    combine: unbiased (`normalize_weights` as top_k)
    after the step:   b_e += u * sign(1/E - load_e)              "sign" (DeepSeek-V3)
                  or  b_e += u * (1/E - load_e) / (1/E)          "proportional"

load_e is the share of the batch's token-choices that picked expert e (`expert_load`, before
capacity drops), so an overloaded expert's bias falls and an underloaded one's rises. The bias
is in gate units (softmax probabilities, as DeepSeek-V3's sigmoid affinities are), so its
u = 0.001 means here what it means there. The bias is router *state*, not a parameter
(`vmoe_routing.StatefulRouter`): `vmoe_layers.MoeLayer` keeps it in the `router_state`
collection and applies `update_state` after every training step with the batch's metrics.

Shape legend: G groups, S tokens per group, D model dim, E experts, K choices per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

import vmoe_plugins
import vmoe_routing

Array = jax.Array
BIAS_RULES = ("sign", "proportional")
PRIORITIES = (None, "max", "sum")
# Loads within this relative distance of the mean count as balanced by the sign rule: the
# batch's load joined over devices (a mean of means) and over one device's groups differ in
# float32 rounding only, and an expert at exactly the mean load must not move one way on one
# mesh and the other way on another. A real imbalance of one token-choice is larger as long as
# an expert's mean share holds fewer than 10^6 choices per step.
BALANCED_RTOL = 1e-6


def bias_step(expert_load_e: Array, rule: str) -> Array:
    """[E] -> [E]: how each expert's bias moves after a step, before the rate u.

    `expert_load_e`: the share of token-choices each expert got (sums to 1, mean 1/E).
    "sign": +1 below the mean load, -1 above, 0 within `BALANCED_RTOL` of it (DeepSeek-V3).
    "proportional": (mean - load) / mean: 1 for an idle expert, -(E - 1) for one that got all.
    """
    vmoe_plugins.check_choice("bias_rule", rule, BIAS_RULES)
    mean = 1.0 / expert_load_e.shape[-1]
    error = mean - expert_load_e.astype(jnp.float32)
    if rule == "sign":
        return jnp.where(jnp.abs(error) <= BALANCED_RTOL * mean, 0.0, jnp.sign(error))
    return error / mean


@dataclasses.dataclass(frozen=True)
class AuxFreeRouter(vmoe_routing.TopKRouter):
    """Top-K routing balanced by a per-expert selection bias (state), not by an auxiliary loss.

    Attributes (besides `vmoe_routing.TopKRouter`'s num_experts, k, capacity options,
    gate_dtype, normalize_weights and the loss weights):
      bias_rate: u, how far a bias moves per step (0.001, as DeepSeek-V3); 0 freezes it.
      bias_rule: "sign" (u * sign(mean - load), DeepSeek-V3) or "proportional"
        (u * (mean - load) / mean: faster far from balance, still near it); see `bias_step`.
      priority_score: None (buffers filled in token order, as top_k) or, as bpr's, "max" / "sum"
        (Batch Priority Routing by the largest / the sum of the token's chosen *unbiased* gates).
      noise_std: 0 by default (DeepSeek-V3 adds no noise); > 0 adds top_k's training noise.
      importance_loss_weight, gshard_loss_weight, z_loss_weight: 0 by default (balance comes
        from the bias); still allowed, on the unbiased gates. load_loss_weight must stay 0: the
        load loss models top-K of the noisy logits, and this router selects by biased gates.
    """

    name: ClassVar[str] = "aux_free"

    noise_std: float = 0.0
    importance_loss_weight: float = 0.0
    load_loss_weight: float = 0.0
    bias_rate: float = 0.001
    bias_rule: str = "sign"
    priority_score: str | None = None

    def __post_init__(self) -> None:
        load = vmoe_plugins.check_number("load_loss_weight", self.load_loss_weight, at_least=0)
        if load > 0:
            raise ValueError(
                f"load_loss_weight={load} is not available with router 'aux_free': the load "
                "loss models top-K of the noisy logits, and aux_free selects by biased gates; "
                "allowed: 0 (balance comes from the bias, bias_rate), or an importance / gshard "
                "loss (importance_loss_weight, gshard_loss_weight)"
            )
        super().__post_init__()
        rate = vmoe_plugins.check_number("bias_rate", self.bias_rate, at_least=0)
        object.__setattr__(self, "bias_rate", float(rate))
        vmoe_plugins.check_choice("bias_rule", self.bias_rule, BIAS_RULES)
        vmoe_plugins.check_choice("priority_score", self.priority_score, PRIORITIES)

    # Router state (vmoe_routing.StatefulRouter).

    def init_state(self, d_model: int) -> dict[str, Array]:
        """{"bias": [E] float32 zeros}: no expert favoured at the start."""
        del d_model
        return {"bias": jnp.zeros((self.num_experts,), jnp.float32)}

    def update_state(self, state: dict[str, Array], metrics: dict[str, Array]) -> dict[str, Array]:
        """The bias after a training step: `b + bias_rate * bias_step(expert_load, bias_rule)`,
        `expert_load` [E] the batch's (joined over every group and device). No gradient."""
        if "expert_load" not in metrics:
            raise ValueError(
                f"router 'aux_free' updates its bias from the metric 'expert_load' [E]; the "
                f"metrics given have {sorted(metrics)}"
            )
        step = bias_step(jax.lax.stop_gradient(metrics["expert_load"]), self.bias_rule)
        bias = self._bias(state) + self.bias_rate * step
        return {"bias": jax.lax.stop_gradient(bias)}

    def _bias(self, state: Any) -> Array:
        bias = state.get("bias") if isinstance(state, Mapping) else None
        if bias is None or jnp.shape(bias) != (self.num_experts,):
            shape = None if bias is None else jnp.shape(bias)
            raise ValueError(
                f"router 'aux_free' needs state={{'bias': [E={self.num_experts}]}} (from "
                f"router.init_state(d_model); vmoe_layers.MoeLayer passes it); got "
                f"{'no state' if state is None else f'a bias of shape {shape}'}"
            )
        return jax.lax.stop_gradient(jnp.asarray(bias, jnp.float32))

    # Routing.

    def __call__(
        self,
        params: dict[str, Array],
        x_gsd: Array,
        *,
        rng: Array | None = None,
        deterministic: bool = True,
        state: dict[str, Array] | None = None,
    ) -> vmoe_routing.Routing:
        expert_gsk, weight_gsk, aux_loss, aux = self.choose(
            params, x_gsd, rng=rng, deterministic=deterministic, state=state
        )
        return self.assign(
            expert_gsk,
            self.combine_weights(weight_gsk),
            deterministic=deterministic,
            priority_gs=self.priority(weight_gsk),
            aux_loss=aux_loss,
            aux_losses=aux,
        )

    def choose(
        self,
        params: dict[str, Array],
        x_gsd: Array,
        *,
        rng: Array | None = None,
        deterministic: bool = True,
        state: dict[str, Array] | None = None,
    ) -> tuple[Array, Array, Array, dict[str, Array]]:
        """Each token's K choices before any capacity, as `TopKRouter.choose`: (expert_gsk
        [G, S, K] int32, by biased score, best first; weight_gsk [G, S, K] their *unbiased*
        gates; aux_loss; aux_losses). The bias enters only the selection."""
        bias_e = self._bias(state)
        logits, noisy_logits, gates = self.gate(params, x_gsd, rng=rng, deterministic=deterministic)
        # The selection only: no gradient through the biased scores (the weights carry it).
        _, expert_gsk = jax.lax.top_k(jax.lax.stop_gradient(gates) + bias_e, self.k)
        weight_gsk = jnp.take_along_axis(gates, expert_gsk, axis=-1)
        # TopKRouter's losses (the load loss is refused here: it models an unbiased top-K).
        aux_loss, aux = self.aux_losses(logits, noisy_logits, gates, expert_gsk)
        return expert_gsk.astype(jnp.int32), weight_gsk, aux_loss, aux

    def priority(self, weight_gsk: Array) -> Array | None:
        """[G, S] buffer-filling priority from the chosen experts' unbiased gates, or None."""
        if self.priority_score is None:
            return None
        if self.priority_score == "max":
            return jnp.max(weight_gsk, axis=-1)
        return jnp.sum(weight_gsk, axis=-1)
