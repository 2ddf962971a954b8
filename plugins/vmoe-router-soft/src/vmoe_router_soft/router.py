"""Soft MoE routing (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", ICLR 2024).

Every expert has P slots; every slot is a softmax-over-tokens mixture of all the tokens of the
group, and every token's output is a softmax-over-slots mixture of all slot outputs:

    logits[g, s, e, p] = scale * <x[g, s] / |x[g, s]|, phi[:, e, p] / |phi[:, e, p]|>
    dispatch = softmax over s (the S tokens)       slot input  = sum_s dispatch * x[g, s]
    combine  = softmax over (e, p) (the E*P slots) token output = sum_{e,p} combine * y[g, e, p]

Nothing is dropped and nothing is sorted; the decision is a `vmoe_routing.DenseRouting` with
C = P (dispatch and combine go through einsums), so it runs under every sharding strategy,
the expert strategy's all-to-all included. The L2 normalisation of tokens and slot parameters,
with a learned scalar scale (initialised to 1), keeps the logits from growing with D, as the
paper does for large models; `normalize=False` uses the raw x @ phi.

Shape legend: G groups, S tokens per group, D model dim, E experts, P slots per expert.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

import vmoe_plugins
import vmoe_routing

Array = jax.Array
EPS = 1e-6  # in the L2 norms: a zero token gets zero logits instead of NaN


def l2_normalize(x: Array, axis: int) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + EPS)


def _pairwise_cosine(v_nd: Array) -> tuple[Array, Array]:
    """Mean and max cosine similarity over the distinct pairs of the n rows of v [..., n, D]."""
    v = l2_normalize(v_nd, -1)
    sim = jnp.einsum("...nd,...md->...nm", v, v)
    n = sim.shape[-1]
    off = ~jnp.eye(n, dtype=bool)
    if n < 2:
        return jnp.float32(0.0), jnp.float32(0.0)
    mean = jnp.sum(jnp.where(off, sim, 0.0), axis=(-2, -1)) / (n * (n - 1))
    return jnp.mean(mean), jnp.max(jnp.where(off, sim, -jnp.inf))


def slot_similarity(phi_dep: Array, slot_inputs_gnd: Array) -> dict[str, Array]:
    """The slot diagnostics of the Soft MoE paper's analysis, as scalars.

    Returns:
      slot_param_similarity_mean / _max: cosine similarity between the slot parameter vectors
        phi[:, e, p] over distinct pairs of slots. Near 1: slots that would mix the same tokens.
      slot_input_similarity_mean / _max: the same between the slot inputs of a group (the
        dispatched mixtures of tokens), averaged over groups (max over all).
    """
    d, e, p = phi_dep.shape
    param_mean, param_max = _pairwise_cosine(phi_dep.reshape(d, e * p).T)
    input_mean, input_max = _pairwise_cosine(slot_inputs_gnd)
    return {
        "slot_param_similarity_mean": param_mean,
        "slot_param_similarity_max": param_max,
        "slot_input_similarity_mean": input_mean,
        "slot_input_similarity_max": input_max,
    }


@dataclasses.dataclass(frozen=True)
class SoftRouter:
    """Soft MoE: E*P slots, each a softmax mixture of all tokens; dense routing.

    Attributes:
      num_experts: E.
      slots_per_expert: P, the capacity of the dense decision (C = P).
      normalize: L2-normalise tokens and slot parameters and multiply by a learned scale.
    """

    name: ClassVar[str] = "soft"

    num_experts: int
    slots_per_expert: int = 1
    normalize: bool = True

    def __post_init__(self) -> None:
        e = vmoe_plugins.check_int("num_experts", self.num_experts, low=1)
        p = vmoe_plugins.check_int("slots_per_expert", self.slots_per_expert, low=1)
        vmoe_plugins.check_bool("normalize", self.normalize)
        object.__setattr__(self, "num_experts", e)
        object.__setattr__(self, "slots_per_expert", p)

    def replace(self, **changes: Any) -> SoftRouter:
        """A copy with some options changed (validated)."""
        return dataclasses.replace(self, **changes)

    def init(self, rng: Array, d_model: int) -> dict[str, Array]:
        """{"slots": [D, E, P] float32 (normal, std 1/sqrt(D)), "scale": [] float32 = 1}."""
        shape = (d_model, self.num_experts, self.slots_per_expert)
        phi = jax.random.normal(rng, shape, jnp.float32) / jnp.sqrt(d_model)
        return {"slots": phi, "scale": jnp.ones((), jnp.float32)}

    def logits(self, params: dict[str, Array], x_gsd: Array) -> Array:
        """[G, S, E, P] float32 routing logits."""
        phi = params["slots"]
        vmoe_routing.check_tokens(x_gsd, phi.shape[0])
        x = x_gsd.astype(jnp.float32)
        if self.normalize:
            x, phi = l2_normalize(x, -1), params["scale"] * l2_normalize(phi, 0)
        return jnp.einsum("gsd,dep->gsep", x, phi)

    def __call__(
        self,
        params: dict[str, Array],
        x_gsd: Array,
        *,
        rng: Array | None = None,
        deterministic: bool = True,
    ) -> vmoe_routing.DenseRouting:
        del rng, deterministic  # no noise, no capacity: training and evaluation route alike
        logits = self.logits(params, x_gsd)
        g, s, e, p = logits.shape
        dispatch = jax.nn.softmax(logits, axis=1)
        combine = jax.nn.softmax(logits.reshape(g, s, e * p), axis=-1).reshape(g, s, e, p)
        slot_inputs = jnp.einsum("gsn,gsd->gnd", dispatch.reshape(g, s, e * p), x_gsd)
        metrics = slot_similarity(params["slots"], slot_inputs)
        metrics.update(
            # How peaked the mixtures are: 1/S (slot) or 1/(E*P) (token) when uniform, 1 when
            # one token fills a slot / one slot makes a token's output. Means over groups (named
            # `*_mean`, not `*_max`: `vmoe_routing.combine_over_shards` takes a `*_max` as a
            # maximum over groups).
            dispatch_max_mean=jnp.mean(jnp.max(dispatch, axis=1)),
            combine_max_mean=jnp.mean(jnp.max(combine.reshape(g, s, e * p), axis=-1)),
        )
        metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
        return vmoe_routing.DenseRouting(
            dispatch_weights=dispatch,
            combine_weights=combine,
            aux_loss=jnp.float32(0.0),
            metrics=metrics,
        )
