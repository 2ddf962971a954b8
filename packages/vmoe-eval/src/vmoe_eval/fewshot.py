"""Few-shot linear transfer: closed-form L2-regularised least squares on frozen features.

    W, b = fit_linear(train_features, train_labels, num_classes=10, l2=1.0)
    predictions = np.argmax(test_features @ W + b, axis=-1)
    result = fewshot_accuracy(train_features, train_labels, test_features, test_labels)
    result.accuracy, result.l2                      # L2 chosen on held-out train data

The recipe of the V-MoE / big_vision few-shot evaluator: the features (a model's pre-logits)
are standardised with the mean and standard deviation of the training examples (plus 1e-5),
a constant feature `BIAS_FEATURE` (100, so that the bias is almost unregularised) is appended,
and the one-hot labels become {-1, +1} targets Y. The weights solve

    (X^T X + l2 I) w = X^T Y

for every L2 strength of a grid at once: one eigendecomposition of X^T X (or of X X^T when
there are fewer examples than features, with w = X^T (X X^T + l2 I)^-1 Y) gives every solution
as a rescaling of the eigenvalues. `fit_linear` folds the standardisation and the bias feature
back, so its (W, b) act on raw features: `features @ W + b`.

Choosing L2 (`choose_l2`): never on the test examples. With >= 2 examples per class, by
cross-validation on the training examples themselves: fold f holds out the examples whose rank
within their class is f modulo the number of folds (min(folds, smallest class count)), the
others fit, and each L2's held-out accuracy is summed over the folds. With 1 example per class
there is nothing to hold out, so the caller passes held-out examples (the few-shot evaluator
draws a few more examples per class from the training split, disjoint from the shots). The best
held-out accuracy wins; ties go to the lowest held-out squared error to the {-1, +1} targets
(the least-squares objective), then to the larger L2.

Everything here is numpy in float64 (feature matrices of few-shot problems are small).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

BIAS_FEATURE = 100.0  # the constant feature appended for the bias (big_vision's BIAS_CONSTANT)
STD_EPSILON = 1e-5  # added to the features' standard deviation before dividing
DEFAULT_L2_GRID = tuple(2.0**i for i in range(-10, 20))  # 2^-10 .. 2^19, as the original


class FewShotResult(NamedTuple):
    """accuracy on the test examples, the L2 strength used, and how it was chosen (the
    held-out accuracy of every grid value; empty when `l2` was given)."""

    accuracy: float
    l2: float
    l2_scores: dict[float, float]


def fit_linear(
    features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float
) -> tuple[np.ndarray, np.ndarray]:
    """(W [D, C], b [C]) minimising |standardised X w - Y|^2 + l2 |w|^2, acting on raw features.

    Args:
      features: [N, D] training features (e.g. pre-logits).
      labels: int [N] in [0, num_classes).
      num_classes: C; the targets are 2 * one_hot(labels, C) - 1.
      l2: the L2 strength (> 0).
    """
    weights, biases = fit_linear_path(features, labels, num_classes, [l2])
    return weights[0], biases[0]


def fit_linear_path(
    features: np.ndarray, labels: np.ndarray, num_classes: int, l2_grid: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """`fit_linear` for every L2 of `l2_grid` from one eigendecomposition:
    (W [L, D, C], b [L, C])."""
    solver = _Solver(features, labels, num_classes)
    grid = _check_grid(l2_grid)
    pairs = [solver.raw_weights(l2) for l2 in grid]
    return np.stack([w for w, _ in pairs]), np.stack([b for _, b in pairs])


def predict(features: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Predicted classes: argmax of `features @ weights + bias`, int [N]."""
    return np.argmax(np.asarray(features, np.float64) @ weights + bias, axis=-1)


def choose_l2(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    *,
    holdout_features: np.ndarray | None = None,
    holdout_labels: np.ndarray | None = None,
    folds: int = 5,
) -> tuple[float, dict[float, float]]:
    """(the chosen L2, {L2: held-out accuracy}) for a fit on (features, labels).

    With `holdout_features` / `holdout_labels`: fit on all of `features`, score on the held-out
    examples. Without: cross-validation over the training examples (see the module doc); each
    class needs >= 2 examples then, else a ValueError says to pass held-out examples.
    """
    grid = _check_grid(l2_grid)
    x, y = _check_xy(features, labels, num_classes, "features")
    if isinstance(folds, bool) or not isinstance(folds, int | np.integer) or folds < 2:
        raise ValueError(f"folds={folds!r} must be an integer >= 2")
    if (holdout_features is None) != (holdout_labels is None):
        raise ValueError("pass both holdout_features and holdout_labels, or neither")
    correct = np.zeros(len(grid))
    squared = np.zeros(len(grid))
    count = 0
    if holdout_features is not None:
        hx, hy = _check_xy(holdout_features, holdout_labels, num_classes, "holdout_features")
        if hx.shape[1] != x.shape[1]:
            raise ValueError(
                f"holdout_features have {hx.shape[1]} features, the training ones {x.shape[1]}"
            )
        if len(hy) == 0:
            raise ValueError("holdout_features is empty: no held-out example to choose L2 on")
        splits = [(np.arange(len(y)), hx, hy)]
    else:
        per_class = np.bincount(y, minlength=num_classes)
        present = per_class[per_class > 0]
        if present.size == 0 or present.min() < 2:
            smallest = int(np.argmin(np.where(per_class > 0, per_class, np.iinfo(np.int64).max)))
            raise ValueError(
                f"cannot choose L2 by cross-validation: class {smallest} has "
                f"{int(per_class[smallest])} training example(s), and a fold needs >= 2 per "
                "class; pass holdout_features and holdout_labels (examples of the training "
                "split beyond these) or a fixed l2"
            )
        n_folds = int(min(folds, present.min()))
        rank = np.zeros(len(y), np.int64)
        for c in np.unique(y):
            (members,) = np.nonzero(y == c)
            rank[members] = np.arange(len(members))
        fold = rank % n_folds
        splits = [(np.nonzero(fold != f)[0], x[fold == f], y[fold == f]) for f in range(n_folds)]
    for fit_rows, held_x, held_y in splits:
        solver = _Solver(x[fit_rows], y[fit_rows], num_classes)
        targets = 2.0 * np.eye(num_classes)[held_y] - 1.0
        for i, scores in enumerate(solver.scores_path(held_x, grid)):
            correct[i] += np.sum(np.argmax(scores, -1) == held_y)
            squared[i] += np.sum((scores - targets) ** 2)
        count += len(held_y)
    accuracy = correct / count
    # Best accuracy; then the lowest squared error; then the larger L2 (lexsort: last key first).
    order = np.lexsort((-np.asarray(grid), squared, -accuracy))
    best = grid[int(order[0])]
    return best, {float(l2): float(a) for l2, a in zip(grid, accuracy, strict=True)}


def fewshot_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int | None = None,
    *,
    l2: float | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    holdout_features: np.ndarray | None = None,
    holdout_labels: np.ndarray | None = None,
    folds: int = 5,
) -> FewShotResult:
    """Test accuracy of the linear classifier fitted on the training examples.

    `l2` None: chosen by `choose_l2` on the training examples (or the held-out ones, if given);
    the test examples are used only for the final accuracy.
    """
    if num_classes is None:
        num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    scores: dict[float, float] = {}
    if l2 is None:
        l2, scores = choose_l2(
            train_features,
            train_labels,
            num_classes,
            l2_grid,
            holdout_features=holdout_features,
            holdout_labels=holdout_labels,
            folds=folds,
        )
    tx, ty = _check_xy(test_features, test_labels, num_classes, "test_features")
    weights, bias = fit_linear(train_features, train_labels, num_classes, l2)
    if len(ty) == 0:
        raise ValueError("test_features is empty")
    accuracy = float(np.mean(predict(tx, weights, bias) == ty))
    return FewShotResult(accuracy, float(l2), scores)


class _Solver:
    """One eigendecomposition of a standardised, bias-augmented training set; its ridge
    solutions for any L2."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        x, y = _check_xy(features, labels, num_classes, "features")
        if len(y) == 0:
            raise ValueError("no training examples")
        self.mean = x.mean(axis=0)
        self.std = x.std(axis=0) + STD_EPSILON
        xs = self._augment(x)
        targets = 2.0 * np.eye(num_classes)[y] - 1.0  # [N, C] in {-1, +1}
        n, d = xs.shape
        if n >= d:  # primal: (X^T X + l2 I)^-1 X^T Y, X^T X = q diag(e) q^T
            self.eigs, q = np.linalg.eigh(xs.T @ xs)
            self.rhs = q.T @ (xs.T @ targets)
            self.lhs = q
        else:  # dual: X^T (X X^T + l2 I)^-1 Y, X X^T = q diag(e) q^T
            self.eigs, q = np.linalg.eigh(xs @ xs.T)
            self.rhs = q.T @ targets
            self.lhs = xs.T @ q
        self.eigs = np.maximum(self.eigs, 0.0)  # round-off below 0 (Gram matrices are PSD)

    def _augment(self, x: np.ndarray) -> np.ndarray:
        xs = (x - self.mean) / self.std
        return np.concatenate([xs, np.full((len(xs), 1), BIAS_FEATURE)], axis=1)

    def weights(self, l2: float) -> np.ndarray:
        """w [D + 1, C] on standardised, augmented features."""
        return self.lhs @ (self.rhs / (self.eigs + l2)[:, None])

    def raw_weights(self, l2: float) -> tuple[np.ndarray, np.ndarray]:
        w = self.weights(l2)
        weights = w[:-1] / self.std[:, None]
        bias = BIAS_FEATURE * w[-1] - (self.mean / self.std) @ w[:-1]
        return weights, bias

    def scores_path(self, features: np.ndarray, grid: Sequence[float]):
        """Scores [M, C] of `features` for each L2 of `grid`, in order."""
        projected = self._augment(np.asarray(features, np.float64)) @ self.lhs  # [M, k]
        for l2 in grid:
            yield projected @ (self.rhs / (self.eigs + l2)[:, None])


def _check_grid(l2_grid: Sequence[float]) -> list[float]:
    grid = [float(v) for v in np.atleast_1d(np.asarray(l2_grid, dtype=np.float64))]
    if not grid or not all(np.isfinite(v) and v > 0 for v in grid):
        raise ValueError(f"l2 values must be finite numbers > 0; got {list(l2_grid)!r}")
    return grid


def _check_xy(
    features: np.ndarray, labels: np.ndarray, num_classes: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"{what} must be [N, D]; got shape {x.shape}")
    if y.shape != (len(x),) or (y.size and y.dtype.kind not in "iu"):
        raise ValueError(f"labels of {what} must be int [N={len(x)}]; got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels of {what} must be in [0, num_classes={num_classes})")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} holds non-finite values")
    return x, y
