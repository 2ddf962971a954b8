"""Whether a checkpoint's arrays fit a model: every missing, extra and mis-shaped path at once.

    check_fit({"head/kernel": (16, 10)}, {"head/kernel": (16, 1000)})   # TreeMismatchError

One error type and one comparison for every place that loads parameters into a model: a run
evaluated (vmoe-eval), fine-tuning (`finetune`), an original V-MoE checkpoint converted
(`original`, with its names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

Shape = Sequence[int]


class TreeMismatchError(ValueError):
    """Arrays missing, extra or of the wrong shape, every one named by its path.

    Attributes:
      missing: paths the model needs that the checkpoint lacks.
      extra: paths in the checkpoint that the model has no place for.
      mismatched: (path, checkpoint shape, model shape) of arrays present on both sides.
    """

    def __init__(self, missing, extra, mismatched, hints: Iterable[str] = ()):
        self.missing, self.extra, self.mismatched = list(missing), list(extra), list(mismatched)
        problems = [f"missing in the checkpoint: {p}" for p in self.missing]
        problems += [f"not in the model: {p}" for p in self.extra]
        problems += [
            f"shape mismatch: {p}: checkpoint {c} vs model {m}" for p, c, m in self.mismatched
        ]
        message = (
            f"the checkpoint does not fit the model ({len(problems)} problem(s)): "
            + "; ".join(problems)
        )
        hints = list(hints)
        if hints:
            message += " (" + "; ".join(hints) + ")"
        super().__init__(message)


def check_fit(
    expected: Mapping[str, Shape],
    found: Mapping[str, Shape],
    *,
    hints: Iterable[str] = (),
    name: Callable[[str], str] | None = None,
) -> None:
    """Raises `TreeMismatchError` unless `found` ({path: shape}, the checkpoint's) has exactly
    the paths and shapes of `expected` (the model's). `name` maps a found path to the model's
    name for it (default: the same); problems name found arrays by their own path."""
    given = {(name(path) if name else path): path for path in found}
    missing = sorted(set(expected) - set(given))
    extra = sorted(given[p] for p in set(given) - set(expected))
    mismatched = [
        (given[p], tuple(found[given[p]]), tuple(expected[p]))
        for p in sorted(set(expected) & set(given))
        if tuple(found[given[p]]) != tuple(expected[p])
    ]
    if missing or extra or mismatched:
        raise TreeMismatchError(missing, extra, mismatched, hints)
