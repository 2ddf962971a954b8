"""token_choice_routing: K-major buffer filling, capacity, BPR priority; against a slow loop."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe_routing import token_choice_routing
from vmoe_routing.token_choice import rank_within_expert


def reference_assignments(expert_sk, weight_sk, capacity, num_experts, priority_s=None):
    """The obvious loop: first choices of all tokens (in priority order), then second choices..."""
    s, k = expert_sk.shape
    order = list(range(s))
    if priority_s is not None:
        order = sorted(order, key=lambda t: -priority_s[t])  # Python's sort is stable
    fill = [0] * num_experts
    out = []  # (token, expert, slot or None, weight)
    for choice in range(k):
        for token in order:
            e = int(expert_sk[token, choice])
            if fill[e] < capacity:
                out.append((token, e, fill[e], float(weight_sk[token, choice])))
                fill[e] += 1
            else:
                out.append((token, e, None, 0.0))
    return out


def random_choices(rng, g, s, e, k):
    """[G, S, K] distinct experts per token, best first, with decreasing weights."""
    logits = rng.normal(size=(g, s, e))
    gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expert = np.argsort(-gates, axis=-1, kind="stable")[..., :k]
    weight = np.take_along_axis(gates, expert, axis=-1)
    return expert.astype(np.int32), weight.astype(np.float32)


# One compiled program per distinct (shape, capacity): draw from few values so examples share them.
route = jax.jit(token_choice_routing, static_argnames=("num_experts", "capacity"))
shapes = st.tuples(
    st.sampled_from([1, 3]),  # G
    st.sampled_from([1, 7, 24]),  # S
    st.sampled_from([1, 2, 5, 9]),  # E
    st.integers(1, 3),  # K
    st.sampled_from([1, 2, 3, 8, 30]),  # capacity
    st.booleans(),  # BPR
    st.integers(0, 2**31 - 1),  # seed
).filter(lambda t: t[3] <= t[2])


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_matches_the_slow_loop_and_keeps_the_invariants(case):
    g, s, e, k, capacity, bpr, seed = case
    rng = np.random.default_rng(seed)
    expert, weight = random_choices(rng, g, s, e, k)
    # Coarse priorities so that ties (kept in token order) happen often.
    priority = np.round(rng.uniform(size=(g, s)), 1).astype(np.float32) if bpr else None
    routing = route(
        jnp.asarray(expert),
        jnp.asarray(weight),
        num_experts=e,
        capacity=capacity,
        priority_gs=None if priority is None else jnp.asarray(priority),
    )
    for group in range(g):
        expected = reference_assignments(
            expert[group], weight[group], capacity, e, None if priority is None else priority[group]
        )
        token = np.asarray(routing.token[group])
        got_expert = np.asarray(routing.expert[group])
        slot = np.asarray(routing.slot[group])
        valid = np.asarray(routing.valid[group])
        got_weight = np.asarray(routing.weight[group])
        assert token.tolist() == [t for t, *_ in expected]
        assert got_expert.tolist() == [x for _, x, _, _ in expected]
        assert valid.tolist() == [sl is not None for _, _, sl, _ in expected]
        assert slot[valid].tolist() == [sl for _, _, sl, _ in expected if sl is not None]
        assert np.all(slot[~valid] == capacity)
        np.testing.assert_array_equal(got_weight, [w for *_, w in expected])

        # Invariants, stated directly.
        kept_pairs = list(zip(got_expert[valid].tolist(), slot[valid].tolist(), strict=True))
        assert len(set(kept_pairs)) == len(kept_pairs), "two tokens share a buffer slot"
        assert np.bincount(got_expert[valid], minlength=e).max(initial=0) <= capacity
        token_expert = list(zip(token.tolist(), got_expert.tolist(), strict=True))
        assert len(set(token_expert)) == len(token_expert), "a token sits twice in one expert"
        if capacity >= s:
            assert valid.all(), "nothing may be dropped when capacity >= group size"


def test_first_choices_fill_before_second_choices():
    # 3 tokens, 2 experts, K=2, capacity 2. Token order: the first choices of tokens 0,1 take
    # expert 0's two slots, token 2's first choice takes expert 1 slot 0; then second choices:
    # token 0 -> expert 1 slot 1, token 1 -> expert 1 full (dropped), token 2 -> expert 0 full.
    expert = jnp.array([[[0, 1], [0, 1], [1, 0]]])
    weight = jnp.array([[[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]]])
    r = token_choice_routing(expert, weight, num_experts=2, capacity=2)
    assert r.token[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert r.expert[0].tolist() == [0, 0, 1, 1, 1, 0]
    assert r.slot[0].tolist() == [0, 1, 0, 1, 2, 2]
    assert r.valid[0].tolist() == [True, True, True, True, False, False]
    np.testing.assert_allclose(r.weight[0], [0.6, 0.7, 0.8, 0.4, 0.0, 0.0])


def test_bpr_keeps_the_high_priority_token_that_vanilla_drops():
    # Four tokens all want expert 0 (capacity 2). Token 3 is the most confident, token 0 the least.
    expert = jnp.zeros((1, 4, 1), jnp.int32)
    weight = jnp.array([[[0.3], [0.5], [0.6], [0.9]]])
    vanilla = token_choice_routing(expert, weight, num_experts=2, capacity=2)
    bpr = token_choice_routing(
        expert, weight, num_experts=2, capacity=2, priority_gs=weight[..., 0]
    )
    kept = lambda r: sorted(np.asarray(r.token[0])[np.asarray(r.valid[0])].tolist())  # noqa: E731
    assert kept(vanilla) == [0, 1]  # token order: the 0.9 token is dropped
    assert kept(bpr) == [2, 3]  # priority order: the two most confident are kept


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_bpr_kept_sets_are_nested_as_capacity_shrinks(seed, k):
    rng = np.random.default_rng(seed)
    expert, weight = random_choices(rng, 2, 32, 4, k)
    kept = []
    for capacity in (32, 12, 8, 5, 3, 1):
        r = route(
            jnp.asarray(expert),
            jnp.asarray(weight),
            num_experts=4,
            capacity=capacity,
            priority_gs=jnp.asarray(weight[..., 0]),
        )
        token, expert_, valid = (np.asarray(a) for a in (r.token, r.expert, r.valid))  # host
        kept.append(
            {
                (gi, int(t), int(x))
                for gi in range(2)
                for t, x, v in zip(token[gi], expert_[gi], valid[gi], strict=True)
                if v
            }
        )
    for larger, smaller in itertools.pairwise(kept):
        assert smaller <= larger
    assert len(kept[0]) == 2 * 32 * k  # capacity = S keeps every choice


def test_rank_within_expert_counts_earlier_entries():
    expert = jnp.array([2, 0, 2, 2, 1, 0])
    assert rank_within_expert(expert, 3).tolist() == [0, 0, 1, 2, 0, 1]


def test_metrics():
    expert = jnp.array([[[0], [0], [0], [1]]])
    r = token_choice_routing(expert, jnp.ones((1, 4, 1)), num_experts=2, capacity=2)
    assert float(r.metrics["dropped_fraction"]) == pytest.approx(0.25)
    np.testing.assert_allclose(r.metrics["expert_load"], [0.75, 0.25])
    np.testing.assert_allclose(r.metrics["expert_fill"], [1.0, 0.5])


def test_jit_and_vmap_compatible():
    expert, weight = random_choices(np.random.default_rng(0), 2, 8, 4, 2)
    f = jax.jit(lambda e, w: token_choice_routing(e, w, num_experts=4, capacity=3))
    eager = token_choice_routing(
        jnp.asarray(expert), jnp.asarray(weight), num_experts=4, capacity=3
    )
    jitted = f(jnp.asarray(expert), jnp.asarray(weight))
    for name in ("token", "expert", "slot", "valid", "weight"):
        np.testing.assert_array_equal(getattr(eager, name), getattr(jitted, name))
    assert jitted.capacity == 3


@pytest.mark.parametrize(
    ("expert_shape", "weight_shape", "priority_shape", "message"),
    [
        ((2, 4), (2, 4), None, "must both have shape"),
        ((2, 4, 1), (2, 4, 2), None, "must both have shape"),
        ((2, 4, 1), (2, 4, 1), (2, 3), "priority_gs must have shape"),
    ],
)
def test_shape_errors(expert_shape, weight_shape, priority_shape, message):
    priority = None if priority_shape is None else jnp.zeros(priority_shape)
    with pytest.raises(ValueError, match=message):
        token_choice_routing(
            jnp.zeros(expert_shape, jnp.int32),
            jnp.zeros(weight_shape),
            num_experts=2,
            capacity=1,
            priority_gs=priority,
        )
