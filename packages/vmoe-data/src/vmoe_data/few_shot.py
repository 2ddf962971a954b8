"""Few-shot sampling: `shots` examples of every class, drawn with a seed."""

from __future__ import annotations

import numpy as np

from vmoe_plugins import check_int


def few_shot_indices(
    labels: np.ndarray, shots: int, seed: int = 0, num_classes: int | None = None
) -> np.ndarray:
    """Indices of `shots` examples per class, sorted: int64 [num_classes * shots].

    For each class c in 0..num_classes-1 (default: max label + 1), draws `shots` of the indices
    i with labels[i] == c uniformly without replacement, from a generator seeded with
    (seed, c), so a class's draw does not depend on the other classes.

    Args:
      labels: int [N], the label of every example.
      shots: examples per class, >= 1.
      seed: an int >= 0.
      num_classes: the number of classes; every class must have >= shots examples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D int array; got {labels.dtype} {labels.shape}")
    shots = check_int("shots", shots, 1)
    seed = check_int("seed", seed, 0)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    num_classes = check_int("num_classes", num_classes, 0)
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise ValueError(
            f"labels {sorted(set(outside.tolist()))[:5]} are outside [0, num_classes="
            f"{num_classes}); every label must be a class index"
        )
    chosen = []
    for c in range(num_classes):
        (members,) = np.nonzero(labels == c)
        if len(members) < shots:
            raise ValueError(
                f"class {c} has {len(members)} examples, fewer than shots={shots}; "
                f"use shots <= {len(members)} or a larger split"
            )
        rng = np.random.default_rng([seed, c])
        chosen.append(rng.choice(members, size=shots, replace=False))
    if not chosen:
        raise ValueError("no classes to sample from (empty labels)")
    return np.sort(np.concatenate(chosen)).astype(np.int64)
