"""Slow, obvious references the fast paths are tested against (not part of the package)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mlp_expert(p, e, x_d):
    """Expert e of an `mlp` stack on one token: Dense -> GELU (tanh approx.) -> Dense."""
    h = jax.nn.gelu(x_d @ p["w_in"][e] + p["b_in"][e])
    return h @ p["w_out"][e] + p["b_out"][e]


def glu_expert(p, e, x_d):
    """Expert e of a `glu` stack on one token: (silu(x Wg) * (x Wu)) Wo."""
    return (jax.nn.silu(x_d @ p["w_gate"][e]) * (x_d @ p["w_up"][e])) @ p["w_out"][e]


def kept_choices(router, router_params, x_gsd):
    """(token, expert, kept) [G, N] numpy arrays: the router's decision, made concrete."""
    routing = router(router_params, x_gsd, deterministic=True)
    return tuple(np.asarray(a) for a in (routing.token, routing.expert, routing.valid))


def moe_by_loop(router, expert_one, params, x_gsd, choices):
    """y[g, s] = sum over token s's kept choices (e, w) of w * expert_e(x[g, s]).

    `choices` = `kept_choices(...)` (concrete) says which expert each assignment names and
    which survived capacity; the weights are recomputed here (traced) so gradients reach the
    gate. A Python loop over tokens and their kept experts, one token at a time.
    """
    token, expert, kept = choices
    routing = router(params["router"], x_gsd, deterministic=True)
    g_count, s_count, _ = x_gsd.shape
    rows = []
    for g in range(g_count):
        row = []
        for s in range(s_count):
            y = jnp.zeros(x_gsd.shape[-1], x_gsd.dtype)
            for n in np.flatnonzero((token[g] == s) & kept[g]):
                # Indices as arrays, so eager ops compile once, not once per index value.
                e, g_, s_, n_ = (jnp.int32(i) for i in (expert[g, n], g, s, n))
                y = y + routing.weight[g_, n_] * expert_one(params["experts"], e, x_gsd[g_, s_])
            row.append(y)
        rows.append(jnp.stack(row))
    return jnp.stack(rows), routing.aux_loss
