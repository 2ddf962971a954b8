"""Gradient accumulation (`optimizer.microsteps`): n microbatches, one update with their mean
gradient, equal to one step on the whole batch reordered microbatch by microbatch."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from train_worker import tiny_config

import vmoe_layers as vl
import vmoe_train
from vmoe_train.config import validate_config
from vmoe_train.steps import init_model, make_train_step, state_from_params

N, B, CLASSES = 4, 16, 10


def _model(moe: bool) -> vl.VisionTransformer:
    """8x8 images in 4x4 patches: 4 tokens and the class token. Deterministic in training (no
    dropout, no routing noise): microbatches then see what the whole batch sees. The MoE: BPR,
    K=2, a capacity that drops tokens, routing groups of 2 images (a microbatch of 4 images has
    2 of them), the importance loss on (the load loss needs noise)."""
    options = {"k": 2, "capacity_factor": 0.75, "noise_std": 0.0, "load_loss_weight": 0.0}
    return vl.VisionTransformer(
        num_classes=CLASSES,
        patch_size=4,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=32,
        moe=vl.MoeConfig(4, "every-2", router="bpr", router_options=options, group_size=2 * 5)
        if moe
        else None,
    )


def _batch():
    rs = np.random.RandomState(0)
    images = rs.normal(size=(B, 8, 8, 1)).astype(np.float32)
    labels = np.eye(CLASSES, dtype=np.float32)[rs.randint(0, CLASSES, size=B)]
    return {"image": images, "labels": labels}


@pytest.mark.parametrize("moe", [False, True], ids=["vit", "vmoe"])
def test_n_microsteps_equal_one_step_on_the_batch_reordered_by_microbatch(moe):
    model, batch = _model(moe), _batch()
    params = jax.jit(init_model(model).init)(jax.random.key(0), batch["image"][:1])["params"]
    optimizer = optax.sgd(0.1)  # new params = params - 0.1 x the gradient: compares gradients
    state = state_from_params(params, optimizer, jax.random.key(1))
    # Microbatch i holds examples i, i + N, ...: the whole batch in that order is one step.
    reordered = {k: np.concatenate([v[i::N] for i in range(N)]) for k, v in batch.items()}
    whole, whole_metrics = jax.jit(make_train_step(model, optimizer))(state, reordered)
    micro, micro_metrics = jax.jit(make_train_step(model, optimizer, microsteps=N))(state, batch)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        micro.params,
        whole.params,
    )
    assert int(micro.step) == int(whole.step) == 1
    assert not np.allclose(micro.params["head"]["bias"], params["head"]["bias"])  # it moved
    assert set(micro_metrics) == set(whole_metrics)
    for name in ("loss", "aux_loss", "total_loss", "accuracy", "grad_norm"):
        assert float(micro_metrics[name]) == pytest.approx(float(whole_metrics[name]), rel=1e-5)
    if moe:
        assert float(whole_metrics["aux_loss"]) > 0
        dropped = float(whole_metrics["moe_block_1/dropped_fraction"])
        assert dropped > 0  # BPR's per-group ranking decided something
        assert float(micro_metrics["moe_block_1/dropped_fraction"]) == pytest.approx(dropped)


def test_a_batch_that_does_not_split_is_refused_naming_both_numbers():
    step = make_train_step(_model(False), optax.sgd(0.1), microsteps=3)
    params = jax.eval_shape(_model(False).init, jax.random.key(0), np.zeros((1, 8, 8, 1)))
    state = jax.eval_shape(
        lambda p: state_from_params(p, optax.sgd(0.1), jax.random.key(1)), params["params"]
    )
    with pytest.raises(ValueError, match=r"a batch of 16 images does not split into microsteps=3"):
        jax.eval_shape(step, state, jax.eval_shape(_batch))
    with pytest.raises(ValueError, match=r"microsteps=0: must be >= 1"):
        make_train_step(_model(False), optax.sgd(0.1), microsteps=0)


def test_the_config_checks_microsteps_against_the_batch_and_the_routing_groups():
    def problems(*overrides):
        return validate_config(tiny_config(list(overrides)), num_devices=1)

    assert problems("optimizer.microsteps=0") == ["optimizer.microsteps=0: must be >= 1"]
    assert problems("optimizer.microsteps=3") == [
        "batch_size=16: must be divisible by 1 devices x optimizer.microsteps=3 (each device's "
        "batch is split into 3 microbatches)"
    ]
    (group,) = problems("optimizer.microsteps=16")
    assert group.startswith(
        "model.moe.group_images=2: must be 0 or divide the per-device microbatch "
        "(batch_size=16 / 1 devices / 16 microsteps = 1)"
    )


def test_a_run_trains_with_microsteps(tmp_path):
    config = tiny_config(
        [
            "num_steps=2",
            "optimizer.warmup_steps=1",
            "optimizer.microsteps=2",  # 2 microbatches of 8 images, routing groups of 2
            "eval.every_steps=0",
            "checkpoint.every_steps=0",
            "log.every_steps=1",
        ]
    )
    summary = vmoe_train.train(config, tmp_path)
    assert summary["steps"] == 2
    saved = vmoe_train.read_config(tmp_path / "checkpoints")
    assert saved["optimizer"]["microsteps"] == 2
