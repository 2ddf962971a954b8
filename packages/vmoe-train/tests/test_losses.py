"""Losses and accuracy against hand computations."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vmoe_train.losses import classification_loss, smooth_labels, top1_correct
from vmoe_train.steps import make_eval_step, make_train_step, state_from_params


def test_softmax_cross_entropy_by_hand():
    logits = jnp.array([[2.0, 0.0, 0.0]])
    labels = jnp.array([[1.0, 0.0, 0.0]])
    expected = -(2.0 - math.log(math.exp(2) + 2))
    assert float(classification_loss(logits, labels)[0]) == pytest.approx(expected, rel=1e-6)


def test_sigmoid_cross_entropy_sums_classes():
    logits = jnp.array([[0.0, 1.0]])
    labels = jnp.array([[1.0, 0.0]])
    expected = math.log(2) + math.log(1 + math.e)  # -log s(0) - log(1 - s(1))
    loss = classification_loss(logits, labels, kind="sigmoid")
    assert float(loss[0]) == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_spreads_mass():
    smoothed = smooth_labels(jnp.array([[1.0, 0.0, 0.0, 0.0]]), 0.2)
    assert smoothed[0].tolist() == pytest.approx([0.85, 0.05, 0.05, 0.05])
    logits = jnp.zeros((1, 4))
    assert float(classification_loss(logits, jnp.eye(4)[:1], label_smoothing=0.2)[0]) == (
        pytest.approx(math.log(4))
    )


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"loss.kind='hinge' must be one of \('softmax', 'sigm"):
        classification_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), kind="hinge")


# Accuracy: one definition (top1_correct), by hand --------------------------------------------

# Six examples over 4 classes: their top-1 class, the int label, and multi-hot labels.
PREDICTED = [2, 1, 3, 0, 1, 2]
LABEL = [2, 0, 3, 1, 1, 0]
MULTI_HOT = [
    [0, 0, 1, 1],  # 2 is a label
    [1, 1, 0, 0],  # 1 is a label (the int label says 0): counts
    [0, 0, 0, 0],  # no label: never counts
    [1, 0, 0, 0],  # 0 is the label
    [0, 1, 0, 1],  # 1 is a label
    [0, 0, 0, 1],  # 2 is not
]


def test_top1_correct_is_the_label_or_among_the_labels():
    predicted, label = np.array(PREDICTED), np.array(LABEL)
    single = [True, False, True, False, True, False]
    assert top1_correct(predicted, {"label": label}).tolist() == single
    assert top1_correct(predicted, {"labels": np.eye(4)[label]}).tolist() == single  # one-hot
    multi = np.array(MULTI_HOT, np.float32)
    among = [True, True, False, True, True, False]
    assert top1_correct(predicted, {"label": label, "labels": multi}).tolist() == among
    # onehot's on/off values: off is not a label.
    smoothed = np.where(multi > 0, 0.9, 0.025).astype(np.float32)
    smoothed[2] = 0.0  # (an example with no label stays all zeros)
    assert top1_correct(predicted, {"labels": smoothed}).tolist() == among
    # mixup's mixed targets: the larger share is the label.
    mixed = 0.7 * np.eye(4)[label] + 0.3 * np.eye(4)[np.roll(label, 1)]
    assert top1_correct(predicted, {"labels": mixed}).tolist() == single
    # The same on jax arrays, in jit.
    jitted = jax.jit(top1_correct)(jnp.asarray(predicted), {"labels": jnp.asarray(multi)})
    assert np.asarray(jitted).tolist() == among


class _Output(NamedTuple):  # a pytree, as vmoe_layers.ModelOutput
    logits: jax.Array
    aux_loss: jax.Array
    metrics: dict
    aux_losses: dict


class _FixedLogits:
    """A model whose logits are its parameter `logits` [B, C] (whatever the images)."""

    def apply(self, variables, images, **kwargs):
        logits = variables["params"]["logits"] + 0.0 * jnp.sum(images)
        return _Output(logits, jnp.float32(0.0), {}, {})


def test_train_and_eval_steps_count_accuracy_as_top1_correct():
    """Multi-hot labels: the trainer's eval step counted only `label`, its train step only the
    first label (argmax of the targets); vmoe-eval counted any label. Now all three agree."""
    logits = jnp.asarray(np.eye(4)[PREDICTED] * 5.0, jnp.float32)
    multi = jnp.asarray(MULTI_HOT, jnp.float32)
    batch = {
        "image": jnp.zeros((6, 2, 2, 1)),
        "label": jnp.asarray(LABEL),
        "labels": multi,
        "mask": jnp.ones((6,), bool).at[5].set(False),  # the last one is padding
    }
    sums = make_eval_step(_FixedLogits())({"params": {"logits": logits}}, batch)
    assert float(sums["count"]) == 5.0
    assert float(sums["correct"]) == 4.0  # examples 0, 1, 3, 4
    optimizer = optax.sgd(0.0)
    state = state_from_params({"logits": logits}, optimizer, jax.random.key(0))
    _, metrics = make_train_step(_FixedLogits(), optimizer, loss_kind="sigmoid")(state, batch)
    assert float(metrics["accuracy"]) == pytest.approx(4 / 6, rel=1e-6)  # a float32 mean
