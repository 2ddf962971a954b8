"""The built-in routers: gating maths, noise, capacity at train and eval, options and errors."""

import decimal
import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_routing as vr
from vmoe_routing import BprRouter, Router, TopKRouter, get_router


def routed(router, params, x, **kwargs):
    r = router(params, x, **kwargs)
    return {n: np.asarray(getattr(r, n)) for n in ("token", "expert", "slot", "weight", "valid")}, r


@pytest.mark.parametrize("cls", [TopKRouter, BprRouter])
def test_combine_weights_are_the_raw_softmax_of_kept_choices(cls):
    router = cls(num_experts=6, k=2, capacity_factor=0.5)
    params = router.init(jax.random.key(0), 5)
    x = jax.random.normal(jax.random.key(1), (3, 10, 5))
    a, _r = routed(router, params, x)
    gates = np.asarray(jax.nn.softmax(jnp.einsum("gsd,de->gse", x, params["gate"])))
    top2 = np.argsort(-gates, axis=-1)[..., :2]
    assert not a["valid"].all() and a["valid"].any()  # capacity 0.5 drops some choices
    for g in range(3):
        for t, e, w, v in zip(
            a["token"][g], a["expert"][g], a["weight"][g], a["valid"][g], strict=True
        ):
            assert e in top2[g, t]
            assert w == pytest.approx(gates[g, t, e] if v else 0.0, abs=1e-6)


@pytest.mark.parametrize("cls", [TopKRouter, BprRouter])
def test_normalized_weights_are_the_chosen_gates_over_their_sum_with_the_same_drops(cls):
    raw = cls(num_experts=6, k=2, capacity_factor=0.5)
    normalized = raw.replace(normalize_weights=True)
    params = raw.init(jax.random.key(0), 5)
    x = jax.random.normal(jax.random.key(1), (3, 10, 5))
    a, _ = routed(raw, params, x)
    b, _ = routed(normalized, params, x)
    # The same choices are kept (BPR's priority is the raw top-1 gate either way) ...
    for name in ("token", "expert", "slot", "valid"):
        np.testing.assert_array_equal(a[name], b[name])
    # ... and each kept choice weighs its gate / (the sum of the token's two chosen gates).
    gates = np.asarray(jax.nn.softmax(jnp.einsum("gsd,de->gse", x, params["gate"])))
    top2_sum = np.sort(gates, axis=-1)[..., -2:].sum(-1)
    for g in range(3):
        for t, e, w, v in zip(
            b["token"][g], b["expert"][g], b["weight"][g], b["valid"][g], strict=True
        ):
            expected = gates[g, t, e] / top2_sum[g, t] if v else 0.0
            assert w == pytest.approx(expected, abs=1e-6)


def test_normalized_weights_of_a_token_with_no_drop_sum_to_one():
    router = TopKRouter(num_experts=4, k=3, capacity_factor=4.0, normalize_weights=True)
    params = router.init(jax.random.key(0), 8)
    r = router(params, jax.random.normal(jax.random.key(1), (2, 6, 8)))
    per_token = np.zeros((2, 6))
    np.add.at(per_token, (np.arange(2)[:, None], np.asarray(r.token)), np.asarray(r.weight))
    np.testing.assert_allclose(per_token, 1.0, atol=1e-6)


def test_noise_has_std_noise_std_over_num_experts():
    # Zero gate: logits are pure noise n1, n2 ~ N(0, s²) with s = noise_std / E. The top-1 weight
    # is sigmoid(|n1 - n2|), so logit(w)² has mean E[(n1 - n2)²] = 2 s².
    router = TopKRouter(num_experts=2, noise_std=3.0, load_loss_weight=0)
    params = {"gate": jnp.zeros((4, 2))}
    x = jnp.ones((1, 20000, 4))
    a, _ = routed(router, params, x, rng=jax.random.key(0), deterministic=False)
    w = a["weight"][0][a["valid"][0]]
    diff = np.log(w / (1 - w))
    estimated_std = math.sqrt(np.mean(diff**2) / 2)
    assert estimated_std == pytest.approx(3.0 / 2, rel=0.05)


def test_noise_only_in_training_and_reproducible():
    router = TopKRouter(num_experts=4, k=1)
    params = router.init(jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (2, 16, 3))
    clean, _ = routed(router, params, x, rng=jax.random.key(5), deterministic=True)
    clean2, _ = routed(router, params, x)
    np.testing.assert_array_equal(clean["weight"], clean2["weight"])  # rng unused at eval
    noisy, _ = routed(router, params, x, rng=jax.random.key(5), deterministic=False)
    noisy2, _ = routed(router, params, x, rng=jax.random.key(5), deterministic=False)
    np.testing.assert_array_equal(noisy["weight"], noisy2["weight"])
    assert not np.allclose(noisy["weight"], clean["weight"])


def test_training_needs_rng_when_noisy():
    router = TopKRouter(num_experts=4)
    params = router.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match="needs rng when deterministic=False"):
        router(params, jnp.ones((1, 4, 3)), deterministic=False)
    quiet = router.replace(noise_std=0.0, load_loss_weight=0.0)
    quiet(params, jnp.ones((1, 4, 3)), deterministic=False)  # no noise, no rng needed


def test_train_and_eval_capacity_factors():
    router = TopKRouter(num_experts=4, k=2, capacity_factor=1.0, eval_capacity_factor=0.25)
    params = router.init(jax.random.key(0), 3)
    x = jnp.ones((1, 32, 3))
    assert router(params, x, rng=jax.random.key(0), deterministic=False).capacity == 16
    assert router(params, x).capacity == 4
    assert router.replace(eval_capacity_factor=None)(params, x).capacity == 16


def test_replace_overrides_k_and_validates():
    router = BprRouter(num_experts=4, k=2)
    assert router.replace(k=1).k == 1
    assert router.replace(k=1).priority_score == "max"
    with pytest.raises(ValueError, match="k=5 must be <= num_experts=4"):
        router.replace(k=5)


def test_bpr_priority_scores():
    weights = jnp.array([[[0.5, 0.45], [0.6, 0.1]]])
    np.testing.assert_allclose(BprRouter(num_experts=2, k=2).priority(weights), [[0.5, 0.6]])
    by_sum = BprRouter(num_experts=2, k=2, priority_score="sum").priority(weights)
    np.testing.assert_allclose(by_sum, [[0.95, 0.7]])


def test_bpr_keeps_most_confident_tokens_at_low_capacity():
    router = BprRouter(num_experts=2, k=1, capacity_factor=0.25, load_loss_weight=0)
    params = {"gate": jnp.array([[1.0, -1.0]])}
    x = jnp.linspace(0.1, 3.0, 16).reshape(1, 16, 1)  # larger x, more confident for expert 0
    a, r = routed(router, params, x)
    assert r.capacity == 2
    assert sorted(a["token"][0][a["valid"][0]].tolist()) == [14, 15]
    a_vanilla, _ = routed(
        TopKRouter(
            **{
                f: getattr(router, f)
                for f in ("num_experts", "k", "capacity_factor", "load_loss_weight")
            }
        ),
        params,
        x,
    )
    assert sorted(a_vanilla["token"][0][a_vanilla["valid"][0]].tolist()) == [0, 1]


def test_aux_loss_is_the_weighted_sum_of_the_enabled_losses():
    router = TopKRouter(
        num_experts=4,
        k=2,
        importance_loss_weight=0.1,
        load_loss_weight=0.2,
        gshard_loss_weight=0.3,
        z_loss_weight=0.4,
    )
    params = router.init(jax.random.key(0), 3)
    r = router(
        params,
        jax.random.normal(jax.random.key(1), (2, 8, 3)),
        rng=jax.random.key(2),
        deterministic=False,
    )
    assert set(r.aux_losses) == {"importance", "load", "gshard", "z"}
    expected = sum(
        w * float(r.aux_losses[n])
        for n, w in (("importance", 0.1), ("load", 0.2), ("gshard", 0.3), ("z", 0.4))
    )
    assert float(r.aux_loss) == pytest.approx(expected, rel=1e-6)
    off = router.replace(
        importance_loss_weight=0, load_loss_weight=0, gshard_loss_weight=0, z_loss_weight=0
    )
    r_off = off(params, jnp.ones((2, 8, 3)), rng=jax.random.key(2), deterministic=False)
    assert r_off.aux_losses == {} and float(r_off.aux_loss) == 0.0


def test_gate_dtype_bfloat16_routes():
    router = TopKRouter(num_experts=4, k=2, gate_dtype=jnp.bfloat16)
    params = router.init(jax.random.key(0), 8)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8), jnp.bfloat16)
    r = router(params, x)
    assert r.weight.dtype == jnp.float32
    assert bool(jnp.all(r.weight[r.valid] > 0))


def test_jit_of_a_router_call():
    router = BprRouter(num_experts=4, k=2)
    params = router.init(jax.random.key(0), 3)
    x = jax.random.normal(jax.random.key(1), (2, 8, 3))
    jitted = jax.jit(lambda p, x, rng: router(p, x, rng=rng, deterministic=False))(
        params, x, jax.random.key(3)
    )
    eager = router(params, x, rng=jax.random.key(3), deterministic=False)
    # jit vs eager compile differently: float32 rounding may differ (1 ulp seen).
    np.testing.assert_allclose(jitted.weight, eager.weight, rtol=1e-5, atol=1e-6)


def test_protocol_requires_replace():
    class NoReplace:
        num_experts = 2

        def init(self, rng, d_model):
            return {}

        def __call__(self, params, x_gsd, *, rng=None, deterministic=True):
            raise NotImplementedError

    assert not isinstance(NoReplace(), Router)


def test_built_ins_satisfy_the_router_protocol():
    assert isinstance(get_router("top_k", num_experts=2), Router)
    assert isinstance(get_router("bpr", num_experts=2), Router)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_experts=4, k=5), "k=5 must be <= num_experts=4"),
        (dict(num_experts=4, k=0), "k=0 must be an integer >= 1"),
        (dict(num_experts=0), "num_experts=0 must be an integer >= 1"),
        (dict(num_experts=4, capacity_factor=0), "capacity_factor=0 must be a finite number > 0"),
        (
            dict(num_experts=4, capacity_factor=-0.5),
            "capacity_factor=-0.5 must be a finite number > 0",
        ),
        (
            dict(num_experts=4, eval_capacity_factor=0.0),
            "eval_capacity_factor=0.0 must be a finite number > 0",
        ),
        (dict(num_experts=4, noise_std=-1.0), "noise_std=-1.0 must be a finite number >= 0"),
        (dict(num_experts=4, noise_std=0.0), "load_loss_weight=0.005 needs noise_std > 0"),
        (
            dict(num_experts=4, z_loss_weight=-1.0),
            "z_loss_weight=-1.0 must be a finite number >= 0",
        ),
        (dict(num_experts=4, capacity_rounding="up"), "capacity_rounding='up' must be one of"),
        (dict(num_experts=4, priority_score="min"), "priority_score='min' must be one of"),
        (dict(num_experts=4, k=1, hidden=3), r"unknown option\(s\) \['hidden'\] for router 'bpr'"),
        (dict(num_experts=4, noise_std=True), "noise_std=True must be a finite number >= 0"),
        (dict(num_experts=4, normalize_weights="yes"), "normalize_weights='yes' must be True or"),
        (dict(num_experts=4, capacity_factor=float("nan")), "capacity_factor=nan must be a finite"),
        (
            dict(num_experts=4, capacity_multiple_of=4.0),
            "capacity_multiple_of=4.0 must be an integer",
        ),
        (dict(num_experts=4, capacity_multiple_of=False), "capacity_multiple_of=False must be an"),
    ],
)
def test_bad_options_are_one_line_value_errors(options, message):
    with pytest.raises(ValueError, match=message) as error:
        get_router("bpr", **options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("shape", [(4, 3), (1, 2, 4, 3), (3,)])
def test_wrong_rank_of_x_is_a_one_line_value_error(shape):
    router = TopKRouter(num_experts=2)
    params = router.init(jax.random.key(0), 3)
    with pytest.raises(
        ValueError,
        match=rf"x must have rank 3 \[groups, group_size, d_model\]; got shape \({shape[0]},",
    ) as error:
        router(params, jnp.ones(shape))
    assert "\n" not in str(error.value)


def test_wrong_width_of_x():
    router = TopKRouter(num_experts=2)
    params = router.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match="x has d_model=5 but the router params expect 3"):
        router(params, jnp.ones((1, 2, 5)))


def test_router_load_loss_equals_the_standalone_load_loss_and_its_gradient():
    # The router reuses its top-K for the load loss bar; it must agree with load_loss().
    router = TopKRouter(num_experts=5, k=2, importance_loss_weight=0, load_loss_weight=1.0)
    params = router.init(jax.random.key(0), 4)
    x = jax.random.normal(jax.random.key(1), (2, 9, 4))
    rng = jax.random.key(2)

    def via_router(params):
        return router(params, x, rng=rng, deterministic=False).aux_losses["load"]

    def standalone(params):
        logits = jnp.einsum("gsd,de->gse", x, params["gate"])
        noisy = logits + (1.0 / 5) * vr.gate_noise(rng, logits.shape)
        return vr.load_loss(logits, noisy, 1.0 / 5, 2)

    # Two programs; CV² = var / mean² (~0.09 here) amplifies their float32 rounding ~7x.
    assert float(via_router(params)) == pytest.approx(float(standalone(params)), rel=1e-5)
    np.testing.assert_allclose(
        jax.grad(via_router)(params)["gate"],
        jax.grad(standalone)(params)["gate"],
        rtol=1e-5,
        atol=1e-7,
    )


def test_numpy_numbers_are_accepted_as_options_and_bools_are_not():
    router = TopKRouter(num_experts=np.int64(4), k=np.int32(2), capacity_factor=np.float32(0.5))
    assert router.capacity(16) == 4
    with pytest.raises(ValueError, match="k=True must be an integer"):
        TopKRouter(num_experts=4, k=True)
    with pytest.raises(ValueError, match="capacity_factor=True must be a finite number > 0"):
        TopKRouter(num_experts=4, capacity_factor=True)


def test_numpy_integer_capacity_multiple_of_is_accepted():
    # Was refused with "must be >= 1" (an isinstance(int) check); all integer options now share
    # one rule, and the router keeps plain ints so that equal routers hash equal under jit.
    router = TopKRouter(num_experts=8, capacity_multiple_of=np.int64(4))
    assert router.capacity_multiple_of == 4 and type(router.capacity_multiple_of) is int
    assert router.capacity(10) == 4  # ceil(1 * 1.0 * 10 / 8) = 2, up to a multiple of 4
    assert hash(router) == hash(TopKRouter(num_experts=8, capacity_multiple_of=4))


def test_a_decimal_capacity_factor_is_exact_in_the_router_too():
    # compute_capacity took Decimal("1.1") but the router refused it ("must be a finite number").
    router = TopKRouter(num_experts=4, k=1, capacity_factor=decimal.Decimal("1.1"))
    assert router.capacity(200) == 55 == vr.compute_capacity(200, 4, 1, decimal.Decimal("1.1"))
    assert router.replace(eval_capacity_factor=decimal.Decimal("0.9")).capacity(200) == 45


@pytest.mark.parametrize("scale", [decimal.Decimal("0.5"), fractions.Fraction(1, 2)])
def test_decimal_and_fraction_scales_become_floats_that_jax_can_multiply(scale):
    router = TopKRouter(num_experts=4, k=2, noise_std=scale, load_loss_weight=scale)
    assert router.noise_std == router.load_loss_weight == 0.5
    assert type(router.noise_std) is float
    params = router.init(jax.random.key(0), 3)
    routing = router(params, jnp.ones((1, 8, 3)), rng=jax.random.key(1), deterministic=False)
    assert np.isfinite(float(routing.aux_loss))


def test_get_router_given_a_router_object_says_where_objects_go():
    # Said "unknown router TopKRouter(num_experts=4, ...)" with the object's full repr.
    with pytest.raises(ValueError) as error:
        get_router(TopKRouter(num_experts=4))
    assert str(error.value) == (
        "get_router takes a registered name; got a TopKRouter object: pass router objects to "
        "MoeLayer(router=...) / MoeConfig / create_model directly"
    )
