"""Auxiliary losses against slow loop references on random inputs, and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vmoe_routing import gshard_loss, importance_loss, load_loss, z_loss


def cv_squared(values):
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return var / mean**2


def softmax(row):
    m = max(row)
    exps = [math.exp(v - m) for v in row]
    return [v / sum(exps) for v in exps]


def ref_importance(gates):
    return np.mean([cv_squared([sum(col) for col in zip(*group, strict=True)]) for group in gates])


def ref_load(logits, noisy, std, k):
    per_group = []
    for group_logits, group_noisy in zip(logits, noisy, strict=True):
        p_rows = []
        for row, noisy_row in zip(group_logits, group_noisy, strict=True):
            threshold = sorted(noisy_row, reverse=True)[k - 1]
            phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
            p_rows.append([1 - phi((threshold - v) / std) for v in row])
        per_group.append(cv_squared([sum(col) / len(p_rows) for col in zip(*p_rows, strict=True)]))
    return np.mean(per_group)


def ref_gshard(gates):
    out = []
    for group in gates:
        e = len(group[0])
        top1 = [row.index(max(row)) for row in group]
        f = [top1.count(i) / len(group) for i in range(e)]
        p = [sum(row[i] for row in group) / len(group) for i in range(e)]
        out.append(e * sum(fi * pi for fi, pi in zip(f, p, strict=True)))
    return np.mean(out)


def ref_z(logits):
    rows = [row for group in logits for row in group]
    return np.mean([math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows])


@settings(max_examples=5, deadline=None)
@given(st.integers(1, 3), st.integers(2, 12), st.integers(2, 6), st.integers(0, 2**31 - 1))
@example(1, 8, 2, 30730)  # a near-balanced draw: the importance loss is ~3.7e-7
def test_against_slow_references(g, s, e, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(g, s, e)).astype(np.float32)
    noisy = logits + rng.normal(scale=0.3, size=logits.shape).astype(np.float32)
    gates = [[softmax(row) for row in group] for group in logits.tolist()]
    k = int(rng.integers(1, e + 1))
    gates_array = jnp.asarray(gates, jnp.float32)
    # abs: a balanced draw's importance loss (a squared CV, ~1e-7) is float32 cancellation noise
    # in relative terms (seed 30730: 3.7497e-7 against 3.7507e-7).
    assert float(importance_loss(gates_array)) == pytest.approx(
        ref_importance(gates), rel=1e-4, abs=1e-6
    )
    assert float(gshard_loss(gates_array)) == pytest.approx(ref_gshard(gates), rel=1e-4)
    assert float(z_loss(jnp.asarray(logits))) == pytest.approx(ref_z(logits.tolist()), rel=1e-4)
    got = float(load_loss(jnp.asarray(logits), jnp.asarray(noisy), 0.3, k))
    assert got == pytest.approx(
        ref_load(logits.tolist(), noisy.tolist(), 0.3, k), rel=1e-3, abs=1e-6
    )


E = 4
BALANCED_GATES = jnp.eye(E)[None]  # token s -> expert s, one token each
COLLAPSED_GATES = jnp.tile(jnp.eye(E)[:1], (E, 1))[None]  # every token -> expert 0


def test_balanced_router_by_hand():
    assert float(importance_loss(BALANCED_GATES)) == 0.0
    assert float(gshard_loss(BALANCED_GATES)) == pytest.approx(1.0)  # E * sum(1/E * 1/E)
    zeros = jnp.zeros((1, 8, E))
    assert float(load_loss(zeros, zeros, 0.25, 1)) == 0.0  # every p is 1/2
    assert float(z_loss(zeros)) == pytest.approx(math.log(E) ** 2)


def test_collapsed_router_by_hand():
    # Importance per expert [S, 0, 0, 0]: mean S/E, var S²(E-1)/E², so CV² = E - 1.
    assert float(importance_loss(COLLAPSED_GATES)) == pytest.approx(E - 1)
    assert float(gshard_loss(COLLAPSED_GATES)) == pytest.approx(E)  # f_0 = P_0 = 1
    # Expert 0 sits at the threshold (p = 1/2), the others 40 std below it (p ~ 0): CV² = E - 1.
    logits = jnp.tile(jnp.array([10.0, 0.0, 0.0, 0.0]), (1, 8, 1))
    assert float(load_loss(logits, logits, 0.25, 1)) == pytest.approx(E - 1, rel=1e-5)


def test_losses_are_differentiable_where_balanced():
    logits = jnp.zeros((1, 8, E))
    grads = jax.grad(lambda l: importance_loss(jax.nn.softmax(l)) + load_loss(l, l, 0.25, 1))(
        logits
    )
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_load_loss_needs_noise():
    with pytest.raises(ValueError, match=r"noise_std=0\.0 must be > 0"):
        load_loss(jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 2)), 0.0, 1)
