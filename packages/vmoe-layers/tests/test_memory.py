"""Nothing of shape [G, S, E, C] is materialised on the default path (forward and backward)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

import vmoe_layers as vl
import vmoe_routing

# Sizes where a [G, S, E, C] buffer (2*64*16*64 = 131072 elements) dwarfs everything the index
# path needs: x [G, S, D] = 1024, buffers [G, E, C, D] = 16384, expert hidden [E, G*C, H] = 32768.
G, S, D, E, H = 2, 64, 8, 16, 16
K, CAPACITY_FACTOR = 2, 8.0  # C = ceil(K * 8 * S / E) = 64 slots per expert
C = 64
BIG = G * S * E * C


def _avals(jaxpr):
    """Every value a jaxpr (and the jaxprs nested in it) produces or takes."""
    for var in (*jaxpr.invars, *jaxpr.constvars):
        yield var.aval
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _avals(inner)


def _largest(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    shapes = [tuple(a.shape) for a in _avals(jaxpr) if hasattr(a, "shape")]
    return max(shapes, key=math.prod), shapes


@pytest.mark.parametrize("router", ["top_k", "bpr", "hash"])
def test_layer_forward_and_backward_build_no_gsec_buffer(router):
    layer = vl.MoeLayer(
        num_experts=E,
        mlp_dim=H,
        router=router,
        router_options={"k": K, "capacity_factor": CAPACITY_FACTOR},
    )
    x = jax.random.normal(jax.random.key(0), (G, S, D))
    params = layer.init(jax.random.key(1), x)["params"]

    def loss(params, x):
        rngs = {"gating": jax.random.key(2)}
        out = layer.apply({"params": params}, x, deterministic=False, rngs=rngs)
        return jnp.sum(out.output**2) + out.aux_loss

    largest, shapes = _largest(jax.grad(loss, argnums=(0, 1)), params, x)
    assert (G, S, E, C) not in shapes
    assert math.prod(largest) < BIG // 2, f"largest intermediate {largest}"


def test_the_check_catches_the_one_hot_dispatch():
    """The same inspection flags the dense one-hot reference path: the test can fail."""
    router = vmoe_routing.get_router("top_k", num_experts=E, k=K, capacity_factor=CAPACITY_FACTOR)
    x_gsd = jax.random.normal(jax.random.key(0), (G, S, D))
    params = router.init(jax.random.key(1), D)

    def one_hot_dispatch(x_gsd):
        return vmoe_routing.dispatch(x_gsd, router(params, x_gsd).to_dense())

    largest, shapes = _largest(one_hot_dispatch, x_gsd)
    assert (G, S, E, C) in shapes
    assert math.prod(largest) >= BIG
