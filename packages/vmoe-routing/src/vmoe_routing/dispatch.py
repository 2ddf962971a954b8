"""Moving tokens into expert buffers (dispatch) and expert outputs back to tokens (combine).

The default path works from indices: dispatch gathers each buffer slot's token (one int per
slot, then one [E*C, D] gather), combine gathers each assignment's expert output, scales it by
its weight and adds it to its token. Nothing of shape [G, S, E, C] is built. A `DenseRouting`
goes through einsums instead: that is the path of dense routers and of the one-hot reference
(`dispatch(x, routing.to_dense())`) the tests compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vmoe_routing.decision import BlockRouting, DenseRouting, Routing

Array = jax.Array


AnyRouting = Routing | DenseRouting | BlockRouting


def _check_x(x_gsd: Array, routing: AnyRouting) -> None:
    if x_gsd.ndim != 3:
        raise ValueError(f"x must have shape [G, S, D]; got {x_gsd.shape}")
    expected = (routing.num_groups, routing.group_size)
    if x_gsd.shape[:2] != expected:
        raise ValueError(f"x has [G, S]={x_gsd.shape[:2]} but the routing has [G, S]={expected}")


def dispatch(x_gsd: Array, routing: AnyRouting) -> Array:
    """[G, S, D] tokens -> [G, E, C, D] expert buffers; unused slots are zeros.

    A `BlockRouting` gives [B, b, D] blocks instead (block j for expert `block_expert[j]`)."""
    _check_x(x_gsd, routing)
    if isinstance(routing, BlockRouting):
        rows, d = routing.num_blocks * routing.block_size, x_gsd.shape[-1]
        x_md = x_gsd.reshape(-1, d)
        # Which token fills each row; G*S (out of range -> zeros) for padding rows.
        source = jnp.full((rows,), x_md.shape[0], jnp.int32).at[routing.row].set(routing.token)
        return x_md.at[source].get(mode="fill", fill_value=0).reshape(-1, routing.block_size, d)
    if isinstance(routing, DenseRouting):
        return jnp.einsum("gsec,gsd->gecd", routing.dispatch_weights.astype(x_gsd.dtype), x_gsd)
    e, c, s = routing.num_experts, routing.capacity, routing.group_size

    def one_group(x_sd, token_n, buffer_n):
        # Which token fills each slot; S (out of range -> zeros) for empty slots.
        source = jnp.full((e * c,), s, jnp.int32).at[buffer_n].set(token_n, mode="drop")
        return x_sd.at[source].get(mode="fill", fill_value=0).reshape(e, c, -1)

    return jax.vmap(one_group)(x_gsd, routing.token, routing.buffer_index())


def combine(y_gecd: Array, routing: AnyRouting) -> Array:
    """[G, E, C, D] expert outputs -> [G, S, D]: each token's weighted sum over its kept choices.

    A `BlockRouting` takes the [B, b, D] outputs of `dispatch`'s blocks instead."""
    if isinstance(routing, BlockRouting):
        expected = (routing.num_blocks, routing.block_size)
        if y_gecd.ndim != 3 or y_gecd.shape[:2] != expected:
            raise ValueError(
                f"y must have shape [B, b, D] with [B, b]={expected}; got {y_gecd.shape}"
            )
        g, s, d = routing.num_groups, routing.group_size, y_gecd.shape[-1]
        picked = y_gecd.reshape(-1, d)[routing.row] * routing.weight[:, None].astype(y_gecd.dtype)
        return jnp.zeros((g * s, d), y_gecd.dtype).at[routing.token].add(picked).reshape(g, s, d)
    if y_gecd.ndim != 4:
        raise ValueError(f"y must have shape [G, E, C, D]; got {y_gecd.shape}")
    expected = (routing.num_experts, routing.capacity)
    if y_gecd.shape[1:3] != expected:
        raise ValueError(f"y has [E, C]={y_gecd.shape[1:3]} but the routing has [E, C]={expected}")
    if isinstance(routing, DenseRouting):
        return jnp.einsum("gsec,gecd->gsd", routing.combine_weights.astype(y_gecd.dtype), y_gecd)
    s = routing.group_size

    def one_group(y_ecd, token_n, buffer_n, weight_n):
        y_flat = y_ecd.reshape(-1, y_ecd.shape[-1])
        picked = y_flat.at[buffer_n].get(mode="fill", fill_value=0)  # [N, D]
        contribution = picked * weight_n[:, None].astype(y_ecd.dtype)
        return jnp.zeros((s, y_ecd.shape[-1]), y_ecd.dtype).at[token_n].add(contribution)

    return jax.vmap(one_group)(y_gecd, routing.token, routing.buffer_index(), routing.weight)
