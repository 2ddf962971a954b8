"""A `Routing` needs only its assignments; `no_expert_fraction` counts tokens that lost every
choice, the same in the index and the dense form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vmoe_routing as vr


def test_routing_defaults_for_aux_losses_and_metrics():
    routing = vr.Routing(
        token=jnp.array([[0, 1]], jnp.int32),
        expert=jnp.array([[0, 0]], jnp.int32),
        slot=jnp.array([[0, 1]], jnp.int32),
        weight=jnp.ones((1, 2)),
        valid=jnp.ones((1, 2), bool),
        group_size=2,
        num_experts=1,
        capacity=2,
    )
    assert routing.aux_loss == 0.0 and routing.aux_losses == {} and routing.metrics == {}
    # Still a pytree through jit, and dispatch/combine work with it.
    x = jnp.arange(4.0).reshape(1, 2, 2)
    out = jax.jit(lambda x, r: vr.combine(vr.dispatch(x, r), r))(x, routing)
    np.testing.assert_array_equal(out, x)


def test_no_expert_fraction_by_hand():
    # S=4 tokens, E=2, K=1, all to expert 0, capacity 1: tokens 1, 2, 3 get no expert.
    routing = vr.token_choice_routing(
        jnp.zeros((1, 4, 1), jnp.int32), jnp.ones((1, 4, 1)), num_experts=2, capacity=1
    )
    assert float(routing.no_expert_fraction()) == 0.75
    assert float(routing.metrics["no_expert_fraction"]) == 0.75
    assert float(routing.metrics["dropped_fraction"]) == 0.75


def test_a_token_with_one_kept_choice_of_two_has_an_expert():
    # K=2, both tokens choose experts (0, 1), capacity 1. K-major: first choices first (t0->e0
    # kept, t1->e0 dropped), then second choices (t0->e1 kept, t1->e1 dropped). Token 1 has no
    # expert: 1 of 2 tokens; 2 of 4 choices dropped.
    expert = jnp.array([[[0, 1], [0, 1]]], jnp.int32)
    routing = vr.token_choice_routing(expert, jnp.ones((1, 2, 2)), num_experts=2, capacity=1)
    assert float(routing.no_expert_fraction()) == 0.5
    assert float(routing.metrics["dropped_fraction"]) == 0.5


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    s=st.integers(1, 12),
    e=st.integers(1, 5),
    capacity=st.integers(1, 4),
    data=st.data(),
)
def test_no_expert_fraction_index_and_dense_forms_agree_with_a_loop(seed, s, e, capacity, data):
    k = data.draw(st.integers(1, e))

    @jax.jit  # one program per drawn shape (op-by-op, each shape compiled every op anew)
    def fractions(key):
        weight, expert = jax.lax.top_k(jax.random.uniform(key, (3, s, e)), k)
        routing = vr.token_choice_routing(expert, weight, num_experts=e, capacity=capacity)
        index, dense = routing.no_expert_fraction(), routing.to_dense().no_expert_fraction()
        return routing.token, routing.valid, index, dense

    token, valid, index, dense = jax.device_get(fractions(jax.random.key(seed)))
    expected = np.mean([[not valid[g][token[g] == t].any() for t in range(s)] for g in range(3)])
    assert float(index) == pytest.approx(expected)
    assert float(dense) == pytest.approx(expected, abs=1e-6)  # the one-hot form: float sums
