"""dispatch / combine: the index path equals the one-hot einsum reference and a slow loop,
in values and in gradients (to the tokens, to the expert outputs and through the combine
weights to the router's gate)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vmoe_routing as vr
from vmoe_routing import BprRouter, TopKRouter, combine, dispatch


def loop_dispatch(x, routing):
    g, _s, d = x.shape
    out = np.zeros((g, routing.num_experts, routing.capacity, d), np.float32)
    for gi in range(g):
        for t, e, c, v in zip(
            routing.token[gi], routing.expert[gi], routing.slot[gi], routing.valid[gi], strict=True
        ):
            if v:
                out[gi, e, c] += np.asarray(x[gi, t])
    return out


def loop_combine(y, routing):
    g, _, _, d = y.shape
    out = np.zeros((g, routing.group_size, d), np.float32)
    for gi in range(g):
        for t, e, c, w, v in zip(
            routing.token[gi],
            routing.expert[gi],
            routing.slot[gi],
            routing.weight[gi],
            routing.valid[gi],
            strict=True,
        ):
            if v:
                out[gi, t] += float(w) * np.asarray(y[gi, e, c])
    return out


def make_case(seed, g, s, d, e, k, capacity_factor, bpr):
    router_cls = BprRouter if bpr else TopKRouter
    router = router_cls(num_experts=e, k=k, capacity_factor=capacity_factor, load_loss_weight=0)
    keys = jax.random.split(jax.random.key(seed), 3)
    params = router.init(keys[0], d)
    x = jax.random.normal(keys[1], (g, s, d))
    return router, params, x, keys[2]


# Few distinct shapes, so that hypothesis examples reuse compiled programs.
@functools.partial(jax.jit, static_argnums=0)
def forward_both_paths(router, params, x, rng):
    routing = router(params, x, rng=rng, deterministic=False)
    dense = routing.to_dense()
    buffers = dispatch(x, routing)
    y = jnp.tanh(buffers) + 0.1
    return routing, buffers, dispatch(x, dense), combine(y, routing), combine(y, dense)


cases = st.tuples(
    st.integers(0, 2**31 - 1),
    st.sampled_from([1, 3]),  # G
    st.sampled_from([1, 6, 16]),  # S
    st.sampled_from([3]),  # D
    st.sampled_from([1, 2, 5]),  # E
    st.integers(1, 2),  # K
    st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    st.booleans(),
).filter(lambda c: c[5] <= c[4])


@settings(max_examples=8, deadline=None)
@given(cases)
def test_index_path_equals_einsum_reference_and_slow_loop(case):
    router, params, x, rng = make_case(*case)
    routing, buffers, dense_buffers, out, dense_out = forward_both_paths(router, params, x, rng)
    np.testing.assert_allclose(buffers, dense_buffers, atol=1e-6)
    np.testing.assert_allclose(buffers, loop_dispatch(x, routing), atol=1e-6)
    np.testing.assert_allclose(out, dense_out, atol=1e-6)
    np.testing.assert_allclose(out, loop_combine(jnp.tanh(buffers) + 0.1, routing), atol=1e-6)


@functools.partial(jax.jit, static_argnums=0)  # one program per router and shapes, both paths
def index_and_dense_grads(router, params, x, rng, w_expert, cotangent):
    def loss(params, x, dense):
        routing = router(params, x, rng=rng, deterministic=False)
        if dense:
            routing = routing.to_dense()
        y = jnp.tanh(jnp.einsum("gecd,edf->gecf", dispatch(x, routing), w_expert))
        return jnp.sum(combine(y, routing) * cotangent) + routing.aux_loss

    grad = jax.grad(loss, argnums=(0, 1))
    return grad(params, x, False), grad(params, x, True)


@settings(max_examples=5, deadline=None)
@given(cases)
def test_index_path_gradients_equal_einsum_reference(case):
    router, params, x, rng = make_case(*case)
    d = x.shape[-1]
    w_expert = jax.random.normal(jax.random.key(7), (router.num_experts, d, d))
    cotangent = jax.random.normal(jax.random.key(8), x.shape)
    g_index, g_dense = index_and_dense_grads(router, params, x, rng, w_expert, cotangent)
    np.testing.assert_allclose(g_index[0]["gate"], g_dense[0]["gate"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(g_index[1], g_dense[1], atol=1e-5, rtol=1e-5)


def test_gate_receives_gradient_through_combine_weights():
    router = TopKRouter(num_experts=4, k=2, importance_loss_weight=0, load_loss_weight=0)
    params = router.init(jax.random.key(0), 8)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8))

    def loss(params):
        routing = router(params, x)
        return jnp.sum(combine(dispatch(x, routing) ** 2, routing))

    grad = jax.grad(loss)(params)["gate"]
    assert float(jnp.abs(grad).max()) > 1e-3  # no aux loss: only the combine weights feed it


def test_unused_slots_are_zero_and_dropped_tokens_get_nothing():
    router = TopKRouter(num_experts=2, k=1, capacity_factor=0.5, load_loss_weight=0)
    params = {"gate": jnp.array([[1.0, -1.0]])}  # every token with x > 0 prefers expert 0
    x = jnp.array([[[1.0], [2.0], [3.0], [-1.0]]])
    routing = router(params, x)  # capacity ceil(0.5 * 4 / 2) = 1
    buffers = dispatch(x, routing)
    assert buffers.shape == (1, 2, 1, 1)
    assert buffers[0, :, 0, 0].tolist() == [1.0, -1.0]  # first come, first served
    out = combine(jnp.ones_like(buffers), routing)
    assert out[0, 1, 0] == 0 and out[0, 2, 0] == 0  # tokens 1 and 2 were dropped


def test_shape_mismatch_errors():
    router = TopKRouter(num_experts=2, load_loss_weight=0)
    params = router.init(jax.random.key(0), 4)
    routing = router(params, jnp.ones((2, 6, 4)))
    with pytest.raises(ValueError, match=r"x has \[G, S\]=\(2, 5\) but the routing has"):
        dispatch(jnp.ones((2, 5, 4)), routing)
    with pytest.raises(ValueError, match="x must have shape"):
        dispatch(jnp.ones((6, 4)), routing)
    with pytest.raises(ValueError, match=r"y has \[E, C\]"):
        combine(jnp.ones((2, 3, routing.capacity, 4)), routing)
    with pytest.raises(ValueError, match="y must have shape"):
        combine(jnp.ones((2, 3, 4)), routing)


def test_index_path_builds_no_group_token_expert_capacity_tensor():
    g, s, d, e = 2, 64, 8, 8
    router = TopKRouter(num_experts=e, k=2, load_loss_weight=0)
    params = router.init(jax.random.key(0), d)
    x = jnp.ones((g, s, d))

    def layer(params, x):
        routing = router(params, x)
        return combine(dispatch(x, routing), routing).sum()

    capacity = router.capacity(s)
    forbidden = g * s * e * capacity
    jaxpr = jax.make_jaxpr(jax.grad(layer))(params, x)
    sizes = [
        int(np.prod(v.aval.shape))
        for eqn in jaxpr.jaxpr.eqns
        for v in eqn.outvars
        if hasattr(v.aval, "shape")
    ]
    assert max(sizes) < forbidden / 4, (max(sizes), forbidden)


def _block_routing():
    """2 groups of 3 tokens, K=1: experts [1, 0, 1 | 1, 1, 0] in blocks of 2 rows."""
    expert = jnp.array([1, 0, 1, 1, 1, 0], jnp.int32)
    # Expert 0: 2 choices -> block 0; expert 1: 4 choices -> blocks 1, 2; block 3 unused.
    row = jnp.array([2, 0, 3, 4, 5, 1], jnp.int32)
    return vr.BlockRouting(
        token=jnp.arange(6, dtype=jnp.int32),
        row=row,
        expert=expert,
        weight=jnp.array([0.5, 1.0, 2.0, 1.5, 0.25, 3.0]),
        block_expert=jnp.array([0, 1, 1, 1], jnp.int32),
        num_groups=2,
        group_size=3,
        num_experts=2,
        block_size=2,
    )


def test_block_routing_dispatch_and_combine_by_rows():
    routing = _block_routing()
    x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    blocks = vr.dispatch(x, routing)
    assert blocks.shape == (4, 2, 2)
    flat = np.asarray(blocks).reshape(8, 2)
    np.testing.assert_array_equal(flat[np.asarray(routing.row)], np.asarray(x).reshape(6, 2))
    np.testing.assert_array_equal(flat[6:], 0)  # the unused block is empty
    y = vr.combine(blocks * 10.0, routing)
    np.testing.assert_allclose(y, 10.0 * x * routing.weight.reshape(2, 3, 1))
    assert float(routing.no_expert_fraction()) == 0.0


def test_block_routing_to_routing_is_the_same_decision():
    routing = _block_routing()
    x = jax.random.normal(jax.random.key(0), (2, 3, 2))
    scale = jnp.array([2.0, -1.0])  # expert e multiplies by scale[e]
    blocks = vr.dispatch(x, routing) * scale[routing.block_expert][:, None, None]
    reference = routing.to_routing()
    assert reference.capacity == 3 and reference.token.shape == (2, 3)
    buffers = vr.dispatch(x, reference) * scale[None, :, None, None]
    # Block and capacity-buffer paths are different programs: float32 rounding may differ.
    np.testing.assert_allclose(
        vr.combine(blocks, routing), vr.combine(buffers, reference), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"y must have shape \[B, b, D\]"):
        vr.combine(jnp.ones((3, 2, 2)), routing)
