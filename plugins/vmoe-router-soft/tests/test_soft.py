"""Soft MoE routing: mixtures that sum to one, permutation equivariance, a slow reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_routing as vr
from vmoe_router_soft import SoftRouter

G, S, D, E, P = 2, 6, 5, 3, 2


def _inputs(seed=0, router=None):
    router = router or SoftRouter(num_experts=E, slots_per_expert=P)
    kx, kp, kw = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (G, S, D))
    params = router.init(kp, D)
    params["scale"] = jnp.float32(1.7)
    w_edd = jax.random.normal(kw, (E, D, D)) / np.sqrt(D)
    return router, x, params, w_edd


def _fast(router, params, w_edd, x):
    routing = router(params, x)
    buffers = vr.dispatch(x, routing)  # [G, E, P, D]
    y = jnp.tanh(jnp.einsum("gepd,edf->gepf", buffers, w_edd))
    return vr.combine(y, routing)


def _reference(router, params, w_edd, x):
    """Per group, per slot: normalise, softmax by hand, mix tokens, run the expert, mix back."""
    phi, scale = params["slots"], params["scale"]
    out = []
    for g in range(G):
        xn = x[g] / jnp.sqrt(jnp.sum(x[g] ** 2, -1, keepdims=True) + 1e-6)
        slot_outputs, logits = [], []
        for e in range(E):
            for p in range(P):
                v = phi[:, e, p] / jnp.sqrt(jnp.sum(phi[:, e, p] ** 2) + 1e-6)
                logit = scale * (xn @ v)  # [S]
                weights = jnp.exp(logit - logit.max()) / jnp.sum(jnp.exp(logit - logit.max()))
                slot_input = weights @ x[g]
                slot_outputs.append(jnp.tanh(slot_input @ w_edd[e]))
                logits.append(logit)
        logits = jnp.stack(logits, axis=1)  # [S, E*P]
        combine = jnp.exp(logits - logits.max(1, keepdims=True))
        combine = combine / combine.sum(1, keepdims=True)
        out.append(combine @ jnp.stack(slot_outputs))
    return jnp.stack(out)


def test_registered_through_its_entry_point():
    assert "soft" in vr.available_routers()
    assert vr.ROUTERS.provider("soft").startswith(
        'soft (entry point "soft = vmoe_router_soft.plugin" from vmoe-router-soft'
    )
    assert isinstance(vr.get_router("soft", num_experts=4), SoftRouter)


def test_dispatch_sums_to_one_over_tokens_and_combine_over_slots():
    router, x, params, _ = _inputs()
    routing = router(params, x)
    assert isinstance(routing, vr.DenseRouting) and routing.capacity == P
    np.testing.assert_allclose(routing.dispatch_weights.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(routing.combine_weights.sum(axis=(2, 3)), 1.0, rtol=1e-6)
    assert float(routing.no_expert_fraction()) == 0.0  # every token reaches every slot


def test_outputs_and_gradients_equal_the_slow_reference():
    router, x, params, w_edd = _inputs(1)
    np.testing.assert_allclose(
        _fast(router, params, w_edd, x), _reference(router, params, w_edd, x), atol=1e-5
    )

    def loss(fn):
        return lambda p, w, x: jnp.sum(jnp.sin(3.0 * fn(router, p, w, x)))

    got = jax.grad(loss(_fast), argnums=(0, 1, 2))(params, w_edd, x)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(params, w_edd, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert abs(float(got[0]["scale"])) > 0  # the scale is learned


def test_permuting_the_tokens_permutes_the_output():
    router, x, params, w_edd = _inputs(2)
    perm = np.random.RandomState(0).permutation(S)
    out = _fast(router, params, w_edd, x)
    np.testing.assert_allclose(_fast(router, params, w_edd, x[:, perm]), out[:, perm], atol=1e-6)


def test_normalised_logits_ignore_the_token_norm_and_raw_ones_do_not():
    router, x, params, _ = _inputs(3)
    logits = router.logits(params, x)
    np.testing.assert_allclose(router.logits(params, 10.0 * x), logits, atol=1e-5)
    assert float(jnp.abs(logits).max()) <= float(params["scale"]) + 1e-5  # |cos| <= 1
    raw = router.replace(normalize=False)
    assert not np.allclose(raw.logits(params, 10.0 * x), raw.logits(params, x))


def test_slot_similarity_diagnostics():
    router = SoftRouter(num_experts=2, slots_per_expert=2)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4))
    same = {"slots": jnp.ones((4, 2, 2)), "scale": jnp.float32(1.0)}
    m = router(same, x).metrics
    np.testing.assert_allclose(m["slot_param_similarity_mean"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(m["slot_input_similarity_max"], 1.0, rtol=1e-5)  # same mixtures
    orthogonal = {"slots": jnp.eye(4).reshape(4, 2, 2), "scale": jnp.float32(1.0)}
    m = router(orthogonal, x).metrics
    np.testing.assert_allclose(m["slot_param_similarity_mean"], 0.0, atol=1e-6)
    np.testing.assert_allclose(m["slot_param_similarity_max"], 0.0, atol=1e-6)
    assert 0.25 <= float(m["dispatch_max_mean"]) <= 1.0  # between uniform (1/S) and one token
    assert 0.25 <= float(m["combine_max_mean"]) <= 1.0  # between uniform (1/(E*P)) and one slot


def test_training_and_evaluation_route_alike():
    router, x, params, _ = _inputs(4)
    a = router(params, x, rng=jax.random.key(0), deterministic=False)
    b = jax.jit(lambda p, x: router(p, x))(params, x)
    # Eager vs jit compile differently: float32 rounding may differ (2 ulp seen).
    np.testing.assert_allclose(a.dispatch_weights, b.dispatch_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=2, slots_per_expert=0), "slots_per_expert=0"),
        (dict(num_experts=2, normalize="yes"), "normalize='yes'"),
        (dict(num_experts=2, k=2), r"unknown option\(s\) \['k'\]"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        vr.get_router("soft", **options)
