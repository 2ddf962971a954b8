"""Optimizer and learning-rate schedule from a config: optax, nothing hidden.

    tx = make_optimizer(config.optimizer, num_steps, params)
    clip (global norm) -> adam / adamw / sgd-momentum with the schedule -> per-param multipliers

Adam's first moment is kept in the params' dtype or `mu_dtype`, its second in `nu_dtype`
(float32 by default, whatever the params' dtype).

Parameters are addressed by their path "block_1/moe/experts/w_in": `frozen` (a regex) marks
params that never change (no optimizer state either), `lr_multipliers` ((regex, m), ...) scales
the update of matching params (first match wins; m=0 freezes too), and `weight_decay_on` (a
regex, or "matrices", the default) says which params decay: `decays` (weight matrices, whatever
their name, so that a plugin's experts or router decay too; not biases, norm scales, position
embeddings or the class token).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

import vmoe_layers as vl
from vmoe_train.config import config_get

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


def param_paths(params: Any) -> Any:
    """The tree of "a/b/c" path strings of `params` (same structure)."""

    def name(path, _):
        return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)

    return jax.tree_util.tree_map_with_path(name, params)


def make_schedule(cfg: Any, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine or linear decay
    to `end_learning_rate` where it is set (>= 0), else cosine to `learning_rate * end_lr_ratio`
    and linear to 0; or constant; until `num_steps`."""
    peak, warmup = float(cfg.learning_rate), int(cfg.warmup_steps)
    decay_steps = max(num_steps - warmup, 1)
    end = float(config_get(cfg, "end_learning_rate", -1.0))  # configs saved before it: unset
    if cfg.schedule == "cosine":
        # Unset: the ratio as given, the same schedule bit for bit as before end_learning_rate
        # existed (end / peak may differ from it in the last bit).
        alpha = end / peak if end >= 0 else float(cfg.end_lr_ratio)
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=alpha)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, max(end, 0.0), decay_steps)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r} must be one of {SCHEDULES}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


MATRICES = "matrices"  # `weight_decay_on`'s default: the rule of `decays`
NOT_MATRICES = ("bias", "scale", "pos_embedding", "cls")  # names of non-matrix params of rank 2+


def decays(path: str, shape: tuple[int, ...]) -> bool:
    """True for a weight matrix: a parameter of rank 2 or more (per expert: an expert
    parameter's leading axis stacks the experts) whose name is not one of `NOT_MATRICES`
    (flax's attention biases are [heads, head_dim]; position embeddings [1, T, D])."""
    parts = path.split("/")
    rank = len(shape) - (1 if vl.EXPERTS_KEY in parts[:-1] else 0)
    return rank >= 2 and parts[-1] not in NOT_MATRICES


def decay_mask(weight_decay_on: str, params: Any) -> Any:
    """The tree of booleans: which params decay (`MATRICES`: `decays`; else a regex on paths)."""
    if weight_decay_on == MATRICES:
        return jax.tree.map(
            lambda p, x: decays(p, tuple(jnp.shape(x))), param_paths(params), params
        )
    return jax.tree.map(lambda p: bool(re.search(weight_decay_on, p)), param_paths(params))


def trainable_mask(cfg: Any, params: Any) -> Any:
    """The tree of booleans: which params the optimizer moves (not `frozen`, multiplier > 0)."""
    return jax.tree.map(lambda m: m != 0.0, multipliers(cfg, params))


def _multiplier(path: str, frozen: str, rules: tuple[tuple[str, float], ...]) -> float:
    if frozen and re.search(frozen, path):
        return 0.0
    for pattern, value in rules:
        if re.search(pattern, path):
            return float(value)
    return 1.0


def multipliers(cfg: Any, params: Any) -> Any:
    """The tree of per-param update multipliers (0.0 = frozen) the config asks for."""
    rules = tuple((str(p), float(m)) for p, m in cfg.lr_multipliers)
    return jax.tree.map(lambda path: _multiplier(path, cfg.frozen, rules), param_paths(params))


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by its (static) scale."""

    def scale(u, s):
        # Inside optax.multi_transform, params of another group arrive as MaskedNode.
        return u if isinstance(u, optax.MaskedNode) else u * jnp.asarray(s, u.dtype)

    def update(updates, state, params=None):
        del params
        is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
        return jax.tree.map(scale, updates, scales, is_leaf=is_masked), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _second_moment_in(
    dtype: jnp.dtype, adam: optax.GradientTransformation
) -> optax.GradientTransformation:
    """`adam` (optax.adam or adamw) with its second moment `nu` stored in `dtype`, whatever the
    params' dtype (optax keeps it in theirs). Each update computes in float32 on a float32 copy
    of the gradients; the state then keeps the dtypes `init` gave it (`mu`: the params' or
    mu_dtype) and the updates come out in the gradients' dtype, the params'. Float32 params and
    a float32 `nu`: optax's adam, bit for bit (every cast is to the dtype already there)."""

    def is_adam(state):
        return isinstance(state, optax.ScaleByAdamState)

    def cast_nu(state):
        if not is_adam(state):
            return state
        return state._replace(nu=jax.tree.map(lambda v: v.astype(dtype), state.nu))

    def init(params):
        return jax.tree.map(cast_nu, adam.init(params), is_leaf=is_adam)

    def update(grads, state, params=None):
        wide = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, new_state = adam.update(wide, state, params)
        new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
        return jax.tree.map(lambda u, g: u.astype(g.dtype), updates, grads), new_state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: Any, num_steps: int, params: Any) -> optax.GradientTransformation:
    """The optax transformation for `cfg` (config.optimizer) and the params' tree."""
    schedule = make_schedule(cfg, num_steps)
    decay = decay_mask(cfg.weight_decay_on, params)
    # Adam's first moment: "" the params' dtype, or bfloat16 to halve its memory (the V-MoE
    # release's option). Its second moment: float32 by default whatever the params' dtype (in
    # bfloat16, b2=0.999 moves it by less than its resolution: it would grow but never decay).
    # Configs saved before either field: "".
    mu_dtype = config_get(cfg, "mu_dtype", "") or None
    nu_dtype = jnp.dtype(config_get(cfg, "nu_dtype", "") or jnp.float32)
    if cfg.name == "adam":
        base = optax.adam(schedule, b1=float(cfg.b1), b2=float(cfg.b2), mu_dtype=mu_dtype)
        base = _second_moment_in(nu_dtype, base)
    elif cfg.name == "adamw":
        base = optax.adamw(
            schedule,
            b1=float(cfg.b1),
            b2=float(cfg.b2),
            mu_dtype=mu_dtype,
            weight_decay=float(cfg.weight_decay),
            mask=decay,
        )
        base = _second_moment_in(nu_dtype, base)
    elif cfg.name == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(float(cfg.weight_decay), mask=decay),
            optax.sgd(schedule, momentum=float(cfg.momentum)),
        )
    else:
        raise ValueError(f"optimizer.name={cfg.name!r} must be one of {OPTIMIZERS}")
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
    parts.append(base)
    scales = multipliers(cfg, params)
    if any(s != 1.0 for s in jax.tree.leaves(scales)):
        parts.append(_scale_by_tree(scales))
    tx = optax.chain(*parts)
    frozen = jax.tree.map(lambda s: "frozen" if s == 0.0 else "train", scales)
    if "frozen" in jax.tree.leaves(frozen):
        # Frozen params get no optimizer state at all (not just zero updates).
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, frozen)
    return tx
