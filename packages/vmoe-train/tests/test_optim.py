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
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
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
