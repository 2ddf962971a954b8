"""Auxiliary losses that keep a router's experts balanced.

Each loss is computed per group and averaged over groups. Inputs are [G, S, E].

- importance (V-MoE, App. A): CV² of the per-expert sum of gate probabilities.
- load (V-MoE, App. A): CV² of the per-expert expected load, where a token's load on an expert is
  the probability it would still be among the top-K if the gating noise were drawn again.
- gshard (GShard Alg. 1 / Switch Transformer): E * sum_e f_e * P_e, f_e the fraction of tokens
  whose top-1 is e, P_e the mean gate probability of e. 1 when balanced, E when collapsed.
- z (ST-MoE): mean over tokens of logsumexp(logits)², keeps logits small.

CV² is computed as var / mean² (not std² / mean²) so the gradient stays defined at 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

Array = jax.Array


def _cv_squared(values_ge: Array) -> Array:
    """Per-group CV² of [G, E] values, averaged over groups."""
    return jnp.mean(jnp.var(values_ge, axis=-1) / jnp.mean(values_ge, axis=-1) ** 2)


def importance_loss(gates_gse: Array) -> Array:
    """CV² of sum_s gates[g, s, e] (use the clean, noise-free softmax)."""
    return _cv_squared(jnp.sum(gates_gse, axis=1))


def load_loss(logits_gse: Array, noisy_logits_gse: Array, noise_std: float, k: int) -> Array:
    """CV² of the expected load under re-sampled noise.

    Args:
      logits_gse: clean gate logits.
      noisy_logits_gse: the logits routing used (clean + noise); their k-th largest value per
        token is the bar an expert must clear.
      noise_std: the std of the gating noise actually added (V-MoE: noise_std / E).
      k: choices per token.
    """
    # The k-th largest value is the min of the top-k values. (Slicing [..., -1] out of top_k
    # instead made XLA:CPU fall back to a full sort: 2.5 ms vs 0.16 ms at [8, 200, 32], jax 0.10.2.)
    threshold_gs = jnp.min(jax.lax.top_k(noisy_logits_gse, k)[0], axis=-1)
    return load_loss_from_threshold(logits_gse, threshold_gs, noise_std)


def load_loss_from_threshold(logits_gse: Array, threshold_gs: Array, noise_std: float) -> Array:
    """`load_loss` given each token's bar (its k-th largest noisy logit), e.g. from the top-K
    the router already computed."""
    if not noise_std > 0:
        raise ValueError(f"noise_std={noise_std!r} must be > 0 for the load loss")
    # P(logit + fresh noise >= threshold) for every (token, expert).
    p_gse = 1.0 - norm.cdf((threshold_gs[..., None] - logits_gse) / noise_std)
    return _cv_squared(jnp.mean(p_gse, axis=1))


def gshard_loss(gates_gse: Array) -> Array:
    """E * sum_e (fraction of tokens with top-1 e) * (mean gate of e)."""
    num_experts = gates_gse.shape[-1]
    top1_fraction_ge = jnp.mean(
        jax.nn.one_hot(jnp.argmax(gates_gse, axis=-1), num_experts, dtype=gates_gse.dtype), axis=1
    )
    mean_gate_ge = jnp.mean(gates_gse, axis=1)
    return jnp.mean(num_experts * jnp.sum(top1_fraction_ge * mean_gate_ge, axis=-1))


def z_loss(logits_gse: Array) -> Array:
    """Mean over tokens of logsumexp(logits)²."""
    return jnp.mean(jax.nn.logsumexp(logits_gse, axis=-1) ** 2)
