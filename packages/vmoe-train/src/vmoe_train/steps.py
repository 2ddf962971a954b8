"""The pure pieces of training: create the state, one train step, one eval step.

    state = create_train_state(model, optimizer, seed, sample_images, strategy)
    train_step = make_train_step(model, optimizer, loss_kind="softmax")
    state, metrics = train_step(state, {"image": [B, H, W, C], "labels": [B, classes]})
    eval_step = make_eval_step(model)
    sums = eval_step(state.variables(), {"image": ..., "label": [B] int, "mask": [B] bool})

Both steps are plain functions of arrays (jit them where you use them; the trainer does, with the
state donated). The randomness of step s (routing noise, dropout) is `state.step_rng()`, a
function of the seed and s only, so a resumed run repeats an uninterrupted one bit for bit.

Routers that keep state (`vmoe_routing.has_state`, e.g. an aux-loss-free balancing bias) have it
in `TrainState.router_state`: created with the params, passed to every apply, and replaced after
each train step by `vmoe_layers.update_router_state` from the step's routing metrics (joined over
all devices by the layer, so every device computes the same new state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vmoe_layers as vl
from vmoe_train.losses import classification_loss, top1_correct
from vmoe_train.state import TrainState, model_variables

Array = jax.Array


def init_model(model: vl.VisionTransformer) -> vl.VisionTransformer:
    """`model` with one routing group per image: the same parameters, and it initialises from
    a single sample image whatever the training group size."""
    if model.moe is None or model.moe.group_size is None:
        return model
    return model.clone(moe=dataclasses.replace(model.moe, group_size=None))


def create_train_state(
    model: vl.VisionTransformer,
    optimizer: optax.GradientTransformation,
    seed: int,
    sample_images: Array,
    strategy: Any = None,
) -> TrainState:
    """Fresh parameters and optimizer state (laid out by `strategy` when given).

    `sample_images` only gives shapes (one image is enough). With a strategy the parameters are
    created already sharded (`vmoe_layers.init_sharded`), and the optimizer state follows them.
    """
    root = jax.random.key(seed)
    init_rng, train_rng = jax.random.split(root)
    model = init_model(model)
    if strategy is None:
        variables = jax.jit(model.init)(init_rng, sample_images)
        params, router_state = variables["params"], dict(variables.get(vl.ROUTER_STATE, {}))
    else:
        params = vl.init_sharded(strategy, model, init_rng, sample_images)
        router_state = vl.init_router_state(strategy, model, sample_images)
    return state_from_params(params, optimizer, train_rng, router_state)


def abstract_train_state(
    model: vl.VisionTransformer,
    optimizer: optax.GradientTransformation,
    sample_images: Array,
    strategy: Any,
) -> TrainState:
    """What `create_train_state(model, optimizer, seed, sample_images, strategy)` returns, as
    `jax.ShapeDtypeStruct`s with the same shardings, computing nothing: the target a checkpoint
    is restored into, so that resuming never holds a fresh state beside the restored one."""
    model = init_model(model)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), sample_images))
    shapes = variables["params"]
    params = _with_shardings(shapes, vl.param_shardings(strategy, shapes))
    state_shapes = dict(variables.get(vl.ROUTER_STATE, {}))
    router_state = _with_shardings(state_shapes, vl.router_state_shardings(strategy, state_shapes))
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_state = _with_shardings(opt_shapes, opt_state_shardings(optimizer, params, strategy.mesh))
    # The step and the key, replicated over the mesh: on the devices of every other array (one
    # device of one process would not be, with several processes).
    replicated = jax.sharding.NamedSharding(strategy.mesh, jax.sharding.PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=params,
        opt_state=opt_state,
        rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
        router_state=router_state,
    )


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Any, mesh: Any) -> Any:
    """Where the optimizer state of `params` (arrays or ShapeDtypeStructs with shardings) lives:
    each parameter-shaped part (Adam's moments, momentum) like its parameter, the rest (step
    counts) replicated over `mesh`. Stated, not left to XLA: an output that does not depend on
    its input's values (`zeros_like`) may be placed on one local device, which a restore into
    that layout cannot share with global arrays across processes.

    A state leaf is a parameter's part when its key path ends with that parameter's path (optax
    keeps the params' dict keys in its states, e.g. `...mu['block_1']['moe']['experts']['w_in']`)
    and has its shape."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_path = {_dict_tail(path): p for path, p in jax.tree_util.tree_flatten_with_path(params)[0]}

    def sharding(path: Any, leaf: Any) -> Any:
        param = by_path.get(_dict_tail(path))
        if param is not None and tuple(param.shape) == tuple(leaf.shape):
            return param.sharding
        return replicated

    state = jax.eval_shape(optimizer.init, params)
    return jax.tree_util.tree_map_with_path(sharding, state)


def _dict_tail(path: Any) -> tuple[str, ...]:
    """The trailing dict keys of a key path (a parameter's path inside an optimizer state)."""
    tail: list[str] = []
    for key in reversed(path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        tail.append(str(key.key))
    return tuple(reversed(tail))


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def state_from_params(
    params: Any,
    optimizer: optax.GradientTransformation,
    rng: Array,
    router_state: Any = None,
) -> TrainState:
    """A step-0 state around existing params (e.g. fine-tuning), optimizer state alongside,
    and `router_state` (the routers' state, e.g. `vmoe_layers.init_router_state`; None: {}).

    Params laid out on a mesh (NamedSharding) get the layout `abstract_train_state` describes
    (the optimizer state by `opt_state_shardings`, step and key replicated), so a fresh state and
    a restored one are laid out alike."""
    key_data = jax.random.key_data(rng)
    router_state = dict(router_state or {})
    mesh = _mesh_of(params)
    if mesh is None:
        opt_state = jax.jit(optimizer.init)(params)
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state, key_data, router_state)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shardings = opt_state_shardings(optimizer, params, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    key_host = np.asarray(key_data)  # a constant of the jit below, the same in every process
    step, key = jax.jit(
        lambda: (jnp.zeros((), jnp.int32), jnp.asarray(key_host)),
        out_shardings=(replicated, replicated),
    )()
    # Replicated on the mesh (a fresh `init_router_state` already is; a loaded one may not be).
    router_state = jax.device_put(router_state, jax.tree.map(lambda _: replicated, router_state))
    return TrainState(step, params, opt_state, key, router_state)


def _mesh_of(params: Any) -> Any:
    """The mesh of the first parameter's NamedSharding (None: not laid out on a mesh)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


def global_norm(tree: Any) -> Array:
    """sqrt of the sum of squares of every leaf (the norm gradient clipping uses)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _only(tree: Any, keep: Any) -> list[Array]:
    """The leaves of `tree` where the boolean tree `keep` is True (all if `keep` is None)."""
    leaves = jax.tree.leaves(tree)
    if keep is None:
        return leaves
    return [x for x, k in zip(leaves, jax.tree.leaves(keep), strict=True) if k]


def routing_metrics(output: vl.ModelOutput) -> dict[str, Array]:
    """Per-MoE-block scalars: dropped choices, tokens with no expert, load balance (CV of the
    expert load: 0 is perfectly balanced), and each unweighted aux loss."""
    metrics = {}
    for block, values in output.metrics.items():
        for name in ("dropped_fraction", "no_expert_fraction"):
            if name in values:
                metrics[f"{block}/{name}"] = values[name]
        if "expert_load" in values:
            load = values["expert_load"]
            metrics[f"{block}/load_cv"] = jnp.std(load) / jnp.maximum(jnp.mean(load), 1e-9)
    for block, losses in output.aux_losses.items():
        for name, value in losses.items():
            metrics[f"{block}/aux_{name}"] = value
    return metrics


def make_train_step(
    model: vl.VisionTransformer,
    optimizer: optax.GradientTransformation,
    *,
    loss_kind: str = "softmax",
    label_smoothing: float = 0.0,
    trainable: Any = None,
    microsteps: int = 1,
) -> Callable[[TrainState, dict[str, Array]], tuple[TrainState, dict[str, Array]]]:
    """`step(state, batch) -> (state, metrics)`: one optimizer update on batch["image"] and the
    one-hot batch["labels"] (loss = mean task loss + the routers' weighted aux losses).

    metrics: loss (task), aux_loss, total_loss, accuracy (`losses.top1_correct` against the
    targets), grad_norm (of the `trainable` params:
    a tree of booleans like the params, e.g. `optim.trainable_mask`; None: all) and
    `routing_metrics`.

    `microsteps` = n > 1 accumulates gradients: the batch is split into n microbatches (example
    j in microbatch j % n, so that each device's share of a data-parallel batch is in every
    microbatch), their gradients are computed one after the other and their mean is applied in
    one update: a batch n times larger than fits, for about the memory of one microbatch (plus a
    float32 copy of the gradients). The routers' state (if any) is updated once per step,
    from the microbatches' mean routing metrics. Each microbatch routes its own groups of
    images and draws
    its own routing noise and dropout (the step's key folded with its index), so the update is
    that of one step on the batch reordered microbatch by microbatch: exactly, up to float32
    summation order, for a deterministic model (no noise, no dropout). The metrics are the
    microbatches' means (grad_norm: of the mean gradients; load_cv: the mean of theirs).
    """
    if not isinstance(microsteps, int | np.integer) or isinstance(microsteps, bool):
        raise TypeError(f"microsteps={microsteps!r}: must be an integer >= 1")
    if microsteps < 1:
        raise ValueError(f"microsteps={microsteps}: must be >= 1")

    def grads_and_metrics(params, router_state, images, labels, rng):
        """(grads, metrics, the routers' raw metrics: what their state is updated from)."""
        rngs = {
            vl.GATING_RNG: jax.random.fold_in(rng, 0),
            "dropout": jax.random.fold_in(rng, 1),
        }

        def loss_fn(params):
            variables = model_variables(params, router_state)
            out = model.apply(variables, images, train=True, rngs=rngs)
            task = jnp.mean(classification_loss(out.logits, labels, loss_kind, label_smoothing))
            return task + out.aux_loss, (task, out)

        (total, (task, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        correct = top1_correct(jnp.argmax(out.logits, -1), {"labels": labels})
        metrics = {
            "loss": task,
            "aux_loss": out.aux_loss,
            "total_loss": total,
            "accuracy": jnp.mean(correct.astype(jnp.float32)),
            **routing_metrics(out),
        }
        return grads, metrics, (out.metrics if router_state else {})

    def accumulated(params, router_state, images, labels, rng):
        if images.shape[0] % microsteps:
            raise ValueError(
                f"a batch of {images.shape[0]} images does not split into microsteps="
                f"{microsteps} microbatches; allowed: a multiple of {microsteps}"
            )
        # [B, ...] -> [B/n, n, ...]: microbatch i is column i (examples i, n + i, 2n + i, ...).
        images, labels = (
            x.reshape(x.shape[0] // microsteps, microsteps, *x.shape[1:]) for x in (images, labels)
        )

        def microstep(total, i):
            take = lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)  # noqa: E731
            key = jax.random.fold_in(rng, i)
            part = grads_and_metrics(params, router_state, take(images), take(labels), key)
            return jax.tree.map(lambda t, p: t + p.astype(t.dtype), total, part), None

        # Sums in float32 at least (bfloat16 gradients would lose the later microbatches').
        shapes = jax.eval_shape(
            grads_and_metrics, params, router_state, images[:, 0], labels[:, 0], rng
        )
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes
        )
        total, _ = jax.lax.scan(microstep, zeros, jnp.arange(microsteps))
        return jax.tree.map(lambda t, s: (t / microsteps).astype(s.dtype), total, shapes)

    def step(state: TrainState, batch: dict[str, Array]):
        rng = state.step_rng()
        compute = grads_and_metrics if microsteps == 1 else accumulated
        grads, metrics, router_metrics = compute(
            state.params, state.router_state, batch["image"], batch["labels"], rng
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": global_norm(_only(grads, trainable))}
        # One update per step, from the whole batch's routing (the microbatches' mean).
        router_state = vl.update_router_state(model, state.router_state, router_metrics)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, router_state=router_state
        )
        return new_state, metrics

    return step


def make_eval_step(
    model: vl.VisionTransformer,
    *,
    loss_kind: str = "softmax",
    k: int | None = None,
    capacity_factor: float | None = None,
) -> Callable[[Any, dict[str, Array]], dict[str, Array]]:
    """`eval_step(variables, batch) -> sums` over the real (mask=True) examples of a padded
    batch, `variables` what `model.apply` takes (`TrainState.variables()`: the params, and the
    routers' state where they keep one):
    count, correct (`losses.top1_correct`: against batch["labels"] where the eval
    preprocessing makes [B, C] targets, else batch["label"]) and loss_sum (against
    batch["label"]). `k` / `capacity_factor` override the routers' for evaluation (static: they
    set shapes)."""

    def eval_step(variables: dict[str, Any], batch: dict[str, Array]) -> dict[str, Array]:
        out = model.apply(variables, batch["image"], k=k, capacity_factor=capacity_factor)
        mask = batch["mask"].astype(jnp.float32)
        labels = batch["label"]
        onehot = jax.nn.one_hot(labels, out.logits.shape[-1])
        loss = classification_loss(out.logits, onehot, loss_kind)
        correct = top1_correct(jnp.argmax(out.logits, -1), batch).astype(jnp.float32)
        sums = {
            "count": jnp.sum(mask),
            "correct": jnp.sum(correct * mask),
            "loss_sum": jnp.sum(loss * mask),
        }
        return sums

    return eval_step
