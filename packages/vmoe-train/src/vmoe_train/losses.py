"""Classification losses: softmax or sigmoid cross-entropy with label smoothing.

Upstream V-MoE/ViT pre-training uses sigmoid cross-entropy (multi-label JFT, ImageNet-21k);
fine-tuning and small single-label data use softmax. Both take one-hot (or mixed, from mixup)
targets [B, C] and return a per-example loss [B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
