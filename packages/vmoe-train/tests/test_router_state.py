"""The routers' state in training (`TrainState.router_state`), with the aux-loss-free router
(plugin vmoe-router-aux-free, in this package's test extra): created with the params, laid out
and restored like them, updated once per step from the whole batch's routing, given to every
evaluation, carried into fine-tuning. Kill -9 and resume with it: test_kill_resume.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_worker import tiny_config

import vmoe_layers as vl
import vmoe_train
from vmoe_train import checkpoints, steps
from vmoe_train.setup import build

N, B, CLASSES = 2, 16, 10


def _model(bias_rule: str = "proportional") -> vl.VisionTransformer:
    """Deterministic in training (no dropout, no noise), 4 experts on block 1, groups of 2
    images, a capacity that drops choices: the proportional rule, whose update is linear in the
    load (a mean over microbatches then equals the whole batch's update up to rounding)."""
    options = {"k": 2, "capacity_factor": 0.75, "bias_rate": 0.1, "bias_rule": bias_rule}
    return vl.VisionTransformer(
        num_classes=CLASSES,
        patch_size=4,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=32,
        moe=vl.MoeConfig(4, "every-2", router="aux_free", router_options=options, group_size=10),
    )


def _batch(seed: int = 0):
    rs = np.random.RandomState(seed)
    images = rs.normal(size=(B, 8, 8, 1)).astype(np.float32)
    labels = np.eye(CLASSES, dtype=np.float32)[rs.randint(0, CLASSES, size=B)]
    return {"image": images, "labels": labels}


def _bias(router_state) -> np.ndarray:
    return np.asarray(router_state["block_1"]["moe"]["router"]["bias"])


def _state(model, optimizer):
    return steps.create_train_state(model, optimizer, 0, _batch()["image"][:1])


def test_the_state_is_created_beside_the_params_and_the_step_updates_it_as_the_layer_would():
    model, optimizer, batch = _model(), optax.sgd(0.1), _batch()
    state = _state(model, optimizer)
    assert set(state.router_state) == {"block_1"}  # the one MoE block
    np.testing.assert_array_equal(_bias(state.router_state), np.zeros(4))

    new, metrics = jax.jit(steps.make_train_step(model, optimizer))(state, batch)
    # The layer's own update (a training apply with the collection mutable) is the reference.
    _, updated = model.apply(
        state.variables(), batch["image"], train=True, mutable=[vl.ROUTER_STATE]
    )
    expected = _bias(updated[vl.ROUTER_STATE])
    np.testing.assert_allclose(_bias(new.router_state), expected, rtol=1e-6, atol=1e-7)
    assert np.abs(expected).max() > 0  # the load was uneven: the bias moved
    # By hand: the proportional rule moved it by 0.1 x (1/4 - load) / (1/4); the load it implies
    # has the spread the step reports (load_cv = std / mean of the expert load).
    load = 0.25 * (1.0 - _bias(new.router_state) / 0.1)
    assert load.sum() == pytest.approx(1.0, abs=1e-5)
    cv = float(metrics["moe_block_1/load_cv"])
    assert cv > 0 and np.std(load) / np.mean(load) == pytest.approx(cv, rel=1e-4)
    # The bias is state, not a parameter: the router's params are its gate alone.
    assert set(new.params["block_1"]["moe"]["router"]) == set(
        state.params["block_1"]["moe"]["router"]
    )
    assert jax.tree.leaves(new.params["block_1"]["moe"]["router"])[0].shape != (4,)


def test_microsteps_update_the_state_once_from_the_whole_batchs_load():
    model, optimizer, batch = _model(), optax.sgd(0.1), _batch()
    state = _state(model, optimizer)
    reordered = {k: np.concatenate([v[i::N] for i in range(N)]) for k, v in batch.items()}
    whole, _ = jax.jit(steps.make_train_step(model, optimizer))(state, reordered)
    micro, _ = jax.jit(steps.make_train_step(model, optimizer, microsteps=N))(state, batch)
    np.testing.assert_allclose(
        _bias(micro.router_state), _bias(whole.router_state), rtol=1e-5, atol=1e-7
    )
    # Two updates (one per microbatch) would have moved it about twice as far.
    assert np.abs(_bias(whole.router_state)).max() > 0


def test_the_abstract_state_describes_the_router_state_and_a_checkpoint_restores_it(tmp_path):
    config = tiny_config(["model.moe.router=aux_free"])
    setup = build(config)
    state = steps.create_train_state(
        setup.model, setup.optimizer, 0, setup.sample_images, setup.strategy
    )
    train_step = jax.jit(steps.make_train_step(setup.model, setup.optimizer))
    rs = np.random.RandomState(0)
    images = rs.normal(size=(config.batch_size, *setup.sample_images.shape[1:]))
    labels = np.eye(CLASSES)[rs.randint(0, CLASSES, size=config.batch_size)]
    batch = setup.to_global({"image": images.astype(np.float32), "labels": labels})
    for _ in range(3):
        state, _ = train_step(state, batch)
    assert np.abs(_bias(state.router_state)).max() > 0

    abstract = steps.abstract_train_state(
        setup.model, setup.optimizer, setup.sample_images, setup.strategy
    )
    leaf = abstract.router_state["block_1"]["moe"]["router"]["bias"]
    assert leaf.shape == (4,) and leaf.dtype == jnp.float32
    assert leaf.sharding.is_fully_replicated

    with checkpoints.Checkpointer(tmp_path / "ckpt", every_steps=1, keep=2) as ckpt:
        ckpt.save(3, state, data_state={}, config={})
        ckpt.wait()
        restored = ckpt.restore(abstract).state
    np.testing.assert_array_equal(_bias(restored.router_state), _bias(state.router_state))
    assert restored.router_state["block_1"]["moe"]["router"]["bias"].sharding.is_fully_replicated
    read = checkpoints.restore_router_state(tmp_path / "ckpt", 3)
    np.testing.assert_array_equal(_bias(read), _bias(state.router_state))


def test_evaluation_uses_the_state_and_a_missing_one_is_a_clear_error():
    model, optimizer, batch = _model(), optax.sgd(0.1), _batch()
    state = _state(model, optimizer)
    train_step = jax.jit(steps.make_train_step(model, optimizer))
    for _ in range(2):  # a head that is no longer zero: the logits depend on the routing
        state, _ = train_step(state, batch)
    eval_batch = {
        "image": batch["image"],
        "label": jnp.argmax(batch["labels"], -1),
        "mask": jnp.ones((B,), bool),
    }
    eval_step = jax.jit(steps.make_eval_step(model))
    # A bias that makes expert 0 win every selection: the routing, hence the loss, changes.
    biased = {"block_1": {"moe": {"router": {"bias": jnp.asarray([9.0, 0.0, 0.0, 0.0])}}}}
    plain = eval_step(state.variables(), eval_batch)
    skewed = eval_step(state.replace(router_state=biased).variables(), eval_batch)
    assert float(plain["loss_sum"]) != float(skewed["loss_sum"])
    with pytest.raises(ValueError, match=r"keeps state .* in the 'router_state' collection"):
        eval_step({"params": state.params}, eval_batch)


def test_fine_tuning_starts_from_the_sources_router_state(tmp_path):
    """From real checkpoints (written by the Checkpointer): one whose routers kept a bias, one
    of a top_k model (no router state)."""
    config = tiny_config(["model.moe.router=aux_free"])
    setup = build(config)
    state = steps.create_train_state(
        setup.model, setup.optimizer, 0, setup.sample_images, setup.strategy
    )
    biased = {"block_1": {"moe": {"router": {"bias": jnp.asarray([0.5, -0.25, 0.0, 0.125])}}}}
    plain = build(tiny_config())
    plain_state = steps.create_train_state(
        plain.model, plain.optimizer, 0, plain.sample_images, plain.strategy
    )
    for name, saved in (("source", state.replace(router_state=biased)), ("plain", plain_state)):
        with checkpoints.Checkpointer(tmp_path / name, every_steps=1, keep=1) as ckpt:
            ckpt.save(8, saved, data_state={}, config={})

    got = vmoe_train.trainer.finetune_router_state(setup, tmp_path / "source", 8)
    np.testing.assert_array_equal(_bias(got), [0.5, -0.25, 0.0, 0.125])
    assert got["block_1"]["moe"]["router"]["bias"].sharding.is_fully_replicated
    # A source whose routers keep no state: a fresh (zero) bias.
    fresh = vmoe_train.trainer.finetune_router_state(setup, tmp_path / "plain", 8)
    np.testing.assert_array_equal(_bias(fresh), np.zeros(4))


def test_a_checkpoint_written_before_the_router_state_existed_still_restores(tmp_path):
    """vmoe-train before the router state saved TrainState(step, params, opt_state, rng): such a
    checkpoint (written here as that tree) restores into today's TrainState with no router
    state, and a model whose routers need one is told why it cannot resume from it."""
    setup = build(tiny_config())
    state = steps.create_train_state(
        setup.model, setup.optimizer, 0, setup.sample_images, setup.strategy
    )
    legacy = {f: getattr(state, f) for f in ("step", "params", "opt_state", "rng")}
    with checkpoints.Checkpointer(tmp_path / "old", every_steps=1, keep=1) as ckpt:
        ckpt.save(4, legacy, data_state={"batches": 4}, config={})
    abstract = steps.abstract_train_state(
        setup.model, setup.optimizer, setup.sample_images, setup.strategy
    )
    with checkpoints.Checkpointer(tmp_path / "old", every_steps=1, keep=1) as ckpt:
        restored = ckpt.restore(abstract)
    assert restored.step == 4 and restored.state.router_state == {}
    jax.tree.map(np.testing.assert_array_equal, restored.state.params, state.params)

    stateful = build(tiny_config(["model.moe.router=aux_free"]))
    needs_state = steps.abstract_train_state(
        stateful.model, stateful.optimizer, stateful.sample_images, stateful.strategy
    )
    with (
        checkpoints.Checkpointer(tmp_path / "old", every_steps=1, keep=1) as ckpt,
        pytest.raises(checkpoints.CheckpointError, match=r"holds no router state"),
    ):
        ckpt.restore(needs_state, step=4)
