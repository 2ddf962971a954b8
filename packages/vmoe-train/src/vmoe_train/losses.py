"""Classification losses: softmax or sigmoid cross-entropy with label smoothing; and accuracy.

Upstream V-MoE/ViT pre-training uses sigmoid cross-entropy (multi-label JFT, ImageNet-21k);
fine-tuning and small single-label data use softmax. Both take one-hot (or mixed, from mixup)
targets [B, C] and return a per-example loss [B].

Accuracy (precision@1) has one definition, `top1_correct`, used by the trainer's train and eval
steps and by vmoe-eval's evaluators: an example counts when its top-1 class is a true label.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

LOSSES = ("softmax", "sigmoid")


def smooth_labels(labels_bc: jax.Array, label_smoothing: float) -> jax.Array:
    """(1 - a) * y + a / C: the targets with mass `a` spread uniformly over the C classes."""
    num_classes = labels_bc.shape[-1]
    return labels_bc * (1.0 - label_smoothing) + label_smoothing / num_classes


def classification_loss(
    logits_bc: jax.Array, labels_bc: jax.Array, kind: str = "softmax", label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example loss [B] of logits [B, C] against targets [B, C] (float32 throughout).

    softmax: -sum_c y_c log softmax(z)_c. sigmoid: sum_c of the binary cross-entropy of each
    class (summed over classes, as big_vision does, so its scale grows with C).
    """
    logits = logits_bc.astype(jnp.float32)
    targets = smooth_labels(labels_bc.astype(jnp.float32), label_smoothing)
    if kind == "softmax":
        return optax.softmax_cross_entropy(logits, targets)
    if kind == "sigmoid":
        return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
    raise ValueError(f"loss.kind={kind!r} must be one of {LOSSES}")


def top1_correct(predicted: Any, batch: Mapping[str, Any]) -> Any:
    """[B] bool: whether each example's top-1 class is a true label (precision@1): accuracy,
    as the trainer's train and eval steps and vmoe-eval's evaluators count it.

    `predicted` is the top-1 class, int [B] (the argmax of the logits; also of sigmoid models:
    sigmoid is monotonic). The true labels come from `batch["labels"]` where the batch has it as
    [B, C] targets (the pp op `onehot`: one-hot, multi-hot for multi-label data): the classes
    with the example's largest target, when that is positive: the label of a one-hot vector,
    each label of a multi-hot one (also with `onehot`'s on/off values), the larger share of
    mixup's mixed targets; an example without labels (all zeros) never counts. Otherwise from
    the int `batch["label"]` [B]: the top-1 class is the label. For single-label data both read
    "the argmax is the label".

    jax arrays (also traced, in jit) or numpy arrays (host side), alike.
    """
    labels = batch.get("labels")
    if labels is not None and np.ndim(labels) == 2:
        use_jax = isinstance(labels, jax.Array) or isinstance(predicted, jax.Array)
        xp = jnp if use_jax else np
        target = xp.take_along_axis(labels, predicted[:, None], axis=1)[:, 0]
        return (target > 0) & (target >= xp.max(labels, axis=1))
    return predicted == batch["label"]
