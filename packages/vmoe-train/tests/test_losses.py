"""Losses against hand computations."""

import math

import jax.numpy as jnp
import pytest

from vmoe_train.losses import classification_loss, smooth_labels


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
