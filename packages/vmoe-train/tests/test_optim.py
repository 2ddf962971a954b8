"""Optimizer from config: the schedule's shape, frozen params, lr multipliers, decay masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vmoe_train import optim
from vmoe_train.configs.base import base_config
from vmoe_train.steps import global_norm

PARAMS = {
    "embedding": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))},
    "head": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
}
GRADS = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)


def _cfg(**changes):
    cfg = base_config().optimizer
    cfg.grad_clip_norm = 0.0
    cfg.weight_decay = 0.0
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def _update(cfg, params=PARAMS, grads=GRADS, steps=1):
    tx = optim.make_optimizer(cfg, 100, params)

    @jax.jit  # one program, not every optax op compiled for every leaf's shape on its own
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(tx.init)(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def test_warmup_then_cosine_to_the_end_ratio():
    schedule = optim.make_schedule(_cfg(warmup_steps=10, learning_rate=1.0), 110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.5 * (1 + 0.01), rel=1e-5)  # half-way cosine
    assert float(schedule(110)) == pytest.approx(0.01)


def test_linear_and_constant_schedules():
    linear = optim.make_schedule(_cfg(warmup_steps=0, schedule="linear", learning_rate=2.0), 10)
    assert [float(linear(s)) for s in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    constant = optim.make_schedule(_cfg(warmup_steps=2, schedule="constant"), 10)
    assert float(constant(7)) == pytest.approx(1e-3)


def test_linear_and_cosine_decay_end_at_end_learning_rate():
    """The V-MoE release's schedules: warmup to the peak, then linear or cosine to 1e-5."""
    peak, end = 3e-3, 1e-5
    linear = optim.make_schedule(
        _cfg(warmup_steps=10, schedule="linear", learning_rate=peak, end_learning_rate=end), 110
    )
    assert [float(linear(s)) for s in (5, 10, 60, 110)] == pytest.approx(
        [peak / 2, peak, (peak + end) / 2, end], rel=1e-5
    )
    cosine = optim.make_schedule(
        _cfg(warmup_steps=10, learning_rate=peak, end_learning_rate=end, end_lr_ratio=0.5), 110
    )
    assert float(cosine(60)) == pytest.approx((peak + end) / 2, rel=1e-5)  # half-way
    assert float(cosine(110)) == pytest.approx(end, rel=1e-5)  # end_lr_ratio is not used


def test_adam_first_moment_in_bfloat16():
    cfg = _cfg(name="adamw", mu_dtype="bfloat16", warmup_steps=0, schedule="constant")
    params, state = _update(cfg)
    adam = next(
        s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")
    )
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    # The first step's update is -lr * sign(g) either way (0.5 rounds exactly to bfloat16).
    expected, _ = _update(_cfg(name="adamw", warmup_steps=0, schedule="constant"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, expected)


def _adam(state):
    """The ScaleByAdamState inside an optimizer state."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return next(s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_float32_params_get_optax_adam_bit_for_bit(name):
    """The default second moment (float32) with float32 params: optax's own adam / adamw, the
    same state (structure and dtypes: checkpoints from before optimizer.nu_dtype resume) and
    the same updates to the bit, over steps of random gradients."""
    cfg = _cfg(name=name, weight_decay=0.1, warmup_steps=0, schedule="constant")
    schedule = optim.make_schedule(cfg, 100)
    mask = optim.decay_mask("matrices", PARAMS)
    if name == "adam":
        reference = optax.chain(optax.adam(schedule))  # make_optimizer's chain, of one part
    else:
        reference = optax.chain(optax.adamw(schedule, weight_decay=0.1, mask=mask))
    ours = optim.make_optimizer(cfg, 100, PARAMS)
    state, expected_state = ours.init(PARAMS), reference.init(PARAMS)
    assert jax.tree.structure(state) == jax.tree.structure(expected_state)
    rs = np.random.RandomState(0)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rs.normal(size=p.shape), p.dtype), PARAMS)
        updates, state = jax.jit(ours.update)(grads, state, PARAMS)
        expected, expected_state = jax.jit(reference.update)(grads, expected_state, PARAMS)
        got, want = jax.tree.leaves((updates, state)), jax.tree.leaves((expected, expected_state))
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_bfloat16_params_keep_a_float32_second_moment_and_get_bfloat16_updates():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), GRADS)
    cfg = _cfg(name="adamw", weight_decay=0.1, learning_rate=0.1, warmup_steps=0)
    cfg.schedule = "constant"
    new, state = _update(cfg, params=params, grads=grads, steps=2)
    adam = _adam(state)
    assert {x.dtype for x in jax.tree.leaves((new, adam.mu))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    # The maths of float32 params, to bfloat16's resolution: each of the 2 steps rounds the
    # params (and the update) to 8 significant bits.
    expected, _ = _update(cfg, steps=2)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2 * 2**-8),
        new,
        expected,
    )
    tx = optim.make_optimizer(cfg, 100, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("params_dtype", [jnp.float32, jnp.bfloat16])
def test_nu_dtype_bfloat16_stores_the_second_moment_in_bfloat16(params_dtype):
    params = jax.tree.map(lambda p: p.astype(params_dtype), PARAMS)
    grads = jax.tree.map(lambda g: g.astype(params_dtype), GRADS)
    cfg = _cfg(name="adam", nu_dtype="bfloat16", warmup_steps=0, schedule="constant")
    new, state = _update(cfg, params=params, grads=grads)
    adam = _adam(state)
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves((new, adam.mu))} == {jnp.dtype(params_dtype)}
    # mu_dtype still applies beside it.
    cfg.mu_dtype = "bfloat16"
    _, state = _update(cfg, params=params, grads=grads)
    assert {x.dtype for x in jax.tree.leaves(_adam(state).mu)} == {jnp.dtype(jnp.bfloat16)}


def test_a_bfloat16_second_moment_never_decays():
    """Why nu defaults to float32: with b2=0.999, b2 * nu moves by 0.1%, under bfloat16's
    half-ulp (2^-9 to 2^-8 of the value), so it rounds back to nu: one large gradient and nu
    stays there (smaller steps ever after); float32 decays it as b2^t."""
    big = jax.tree.map(jnp.ones_like, GRADS)
    zero = jax.tree.map(jnp.zeros_like, GRADS)
    nus = {}
    for nu_dtype in ("", "bfloat16"):
        cfg = _cfg(name="adam", nu_dtype=nu_dtype, warmup_steps=0, schedule="constant")
        tx = optim.make_optimizer(cfg, 1000, PARAMS)
        update = jax.jit(tx.update)
        _, state = update(big, tx.init(PARAMS), PARAMS)
        for _ in range(100):
            _, state = update(zero, state, PARAMS)
        nus[nu_dtype] = float(_adam(state).nu["head"]["kernel"][0, 0])
    assert nus[""] == pytest.approx(1e-3 * 0.999**100, rel=1e-4)  # 9.05e-4
    assert nus["bfloat16"] == float(jnp.bfloat16(1e-3))  # the first step's, unchanged


def test_sgd_step_is_minus_lr_times_grad():
    cfg = _cfg(name="sgd", momentum=0.0, warmup_steps=0, schedule="constant", learning_rate=0.1)
    params, _ = _update(cfg)
    np.testing.assert_allclose(params["head"]["kernel"], 1.0 - 0.1 * 0.5)


def test_frozen_params_never_move_and_have_no_optimizer_state():
    cfg = _cfg(name="adam", warmup_steps=0, schedule="constant", frozen=r"^embedding/")
    params, state = _update(cfg, steps=3)
    np.testing.assert_array_equal(params["embedding"]["kernel"], PARAMS["embedding"]["kernel"])
    assert not np.allclose(params["head"]["kernel"], PARAMS["head"]["kernel"])
    # Adam's moments exist only for the trained params.
    shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(state)}
    assert (2, 3) not in shapes and (3, 4) in shapes


def test_lr_multipliers_scale_the_update_first_match_wins():
    base = _cfg(name="sgd", momentum=0.0, warmup_steps=0, schedule="constant", learning_rate=0.1)
    scaled = _cfg(
        name="sgd",
        momentum=0.0,
        warmup_steps=0,
        schedule="constant",
        learning_rate=0.1,
        lr_multipliers=((r"^head/kernel", 10.0), (r"^head/", 0.0)),
    )
    plain, _ = _update(base)
    multiplied, _ = _update(scaled)
    delta = lambda p: np.asarray(PARAMS["head"]["kernel"] - p["head"]["kernel"])  # noqa: E731
    np.testing.assert_allclose(delta(multiplied), 10 * delta(plain), rtol=1e-6)
    np.testing.assert_array_equal(multiplied["head"]["bias"], PARAMS["head"]["bias"])  # x0
    np.testing.assert_array_equal(multiplied["embedding"]["bias"], plain["embedding"]["bias"])


def test_weight_decay_only_on_matching_params():
    cfg = _cfg(name="adamw", weight_decay=0.5, warmup_steps=0, schedule="constant")
    zero = jax.tree.map(jnp.zeros_like, GRADS)  # no gradient: only decay moves params
    params, _ = _update(cfg, grads=zero)
    assert float(params["head"]["kernel"][0, 0]) == pytest.approx(1.0 - 1e-3 * 0.5)
    np.testing.assert_array_equal(params["head"]["bias"], PARAMS["head"]["bias"])


def test_global_norm_clipping():
    cfg = _cfg(name="sgd", momentum=0.0, warmup_steps=0, schedule="constant", learning_rate=1.0)
    cfg.grad_clip_norm = 1.0
    big = jax.tree.map(lambda g: g * 100, GRADS)
    params, _ = _update(cfg, grads=big)
    moved = jax.tree.map(lambda a, b: a - b, PARAMS, params)
    assert float(global_norm(moved)) == pytest.approx(1.0, rel=1e-5)


def test_param_paths():
    assert optim.param_paths(PARAMS)["head"]["bias"] == "head/bias"


def _vmoe_param_shapes():
    """The real parameter tree of a V-MoE (Nano, 4 experts every other block), as shapes."""
    import vmoe_layers as vl

    model = vl.create_model("V-MoE-Nano/4", num_classes=10, num_experts=4)
    images = jnp.zeros((1, 8, 8, 1))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images)["params"])


# The default regex before "matrices" (it missed plugins' matrices): on the built-in model, the
# rule must decay exactly what it did, so that built-in runs keep their results.
OLD_REGEX = r"(kernel|w_in|w_out|w_gate|w_up|gate)$"


def test_matrices_decay_what_the_old_regex_did_on_the_built_in_model():
    shapes = _vmoe_param_shapes()
    new = optim.decay_mask("matrices", shapes)
    old = optim.decay_mask(OLD_REGEX, shapes)
    assert jax.tree.leaves(new) == jax.tree.leaves(old)
    names = {
        p: d for p, d in zip(*map(jax.tree.leaves, (optim.param_paths(shapes), new)), strict=True)
    }
    assert names["block_1/moe/experts/w_in"] and not names["block_1/moe/experts/b_in"]
    assert not names["pos_embedding"] and not names["cls"] and not names["head/bias"]


def test_plugin_matrices_decay_too():
    # Low-rank experts (vmoe-experts-extra) and the soft router's slots (vmoe-router-soft):
    # names no regex knew; biases and the soft router's scale still do not decay.
    e, d, r, h = 4, 8, 2, 16
    params = {
        "block_1": {
            "moe": {
                "experts": {
                    "u_in": jnp.ones((e, d, r)),
                    "v_in": jnp.ones((e, r, h)),
                    "b_in": jnp.ones((e, h)),
                    "u_out": jnp.ones((e, h, r)),
                    "v_out": jnp.ones((e, r, d)),
                    "b_out": jnp.ones((e, d)),
                },
                "router": {"slots": jnp.ones((d, e, 2)), "scale": jnp.ones(())},
            }
        }
    }
    decayed = {
        p: m
        for p, m in zip(
            *map(
                jax.tree.leaves, (optim.param_paths(params), optim.decay_mask("matrices", params))
            ),
            strict=True,
        )
    }
    assert decayed == {
        "block_1/moe/experts/b_in": False,
        "block_1/moe/experts/b_out": False,
        "block_1/moe/experts/u_in": True,
        "block_1/moe/experts/u_out": True,
        "block_1/moe/experts/v_in": True,
        "block_1/moe/experts/v_out": True,
        "block_1/moe/router/scale": False,
        "block_1/moe/router/slots": True,
    }
    assert optim.decay_mask(OLD_REGEX, params) != optim.decay_mask("matrices", params)


def test_adamw_frozen_clipping_and_multipliers_combined_on_real_names():
    """One update of AdamW with weight decay, global-norm clipping, a frozen block and a lr
    multiplier on the experts, against the same maths written out by hand."""
    shapes = _vmoe_param_shapes()
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda s: rs.normal(size=s.shape).astype(np.float32), shapes)
    grads = jax.tree.map(lambda s: rs.normal(size=s.shape).astype(np.float32), shapes)
    lr, wd, clip = 0.1, 0.5, 1.0
    cfg = _cfg(
        name="adamw",
        learning_rate=lr,
        weight_decay=wd,
        warmup_steps=0,
        schedule="constant",
        frozen=r"^block_0/",
        lr_multipliers=((r"/experts/", 0.25),),
    )
    cfg.grad_clip_norm = clip
    new, _ = _update(cfg, params=params, grads=grads)

    paths = optim.param_paths(params)
    trainable = optim.trainable_mask(cfg, params)
    flat = lambda t: jax.tree.leaves(t)  # noqa: E731
    trained_grads = [g for g, t in zip(flat(grads), flat(trainable), strict=True) if t]
    norm = float(global_norm(trained_grads))  # frozen grads do not count in the clipping
    assert norm > clip  # so clipping is exercised
    scale = clip / norm
    for path, p, g, q, t in zip(
        flat(paths), flat(params), flat(grads), flat(new), flat(trainable), strict=True
    ):
        p, g, q = np.asarray(p), np.asarray(g), np.asarray(q)
        if not t:
            np.testing.assert_array_equal(q, p, err_msg=path)  # frozen: untouched
            continue
        g = g * scale
        adam = g / (np.abs(g) + 1e-8)  # first step: m/sqrt(v) = g/|g| (bias-corrected)
        decay = wd * p if optim.decays(path, p.shape) else 0.0
        multiplier = 0.25 if "/experts/" in path else 1.0
        expected = p - multiplier * lr * (adam + decay)
        np.testing.assert_allclose(q, expected, rtol=1e-5, atol=1e-6, err_msg=path)


def test_grad_norm_metric_leaves_frozen_params_out():
    from vmoe_train.steps import _only

    grads = {"a": jnp.full((2,), 3.0), "b": jnp.full((2,), 4.0)}
    keep = {"a": True, "b": False}
    assert float(global_norm(_only(grads, keep))) == pytest.approx(np.sqrt(18.0))
    assert float(global_norm(_only(grads, None))) == pytest.approx(np.sqrt(50.0))
