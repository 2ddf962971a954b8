"""Preprocessing specs: ops chained from a string like big_vision's `pp` specs.

    pp = vmoe_data.preprocess("decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(10)")
    example = pp(example, rng)            # the per-example ops, in order
    batch = pp.apply_batch(batch, rng)    # the batch ops (e.g. mixup), after batching

A spec is a string of `|`-separated op calls, or a list whose items are such strings or ops
(callables). Each call is `name` or `name(args)` with Python literal arguments, positional or
keyword: `resize(32)`, `value_range(vmin=0, vmax=1)`, `keep("image", "label")`. Names are
looked up in the `vmoe_preprocess_ops` registry, so plugins add ops.

Ops marked with `batch_op` work on whole batches (values with a leading batch axis B) and must
come after every per-example op.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vmoe_data.draws import Draws

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]


def batch_op(op: Op) -> Op:
    """Marks `op` as a batch op: it gets and returns whole batches (leading axis B)."""
    op.batched = True  # type: ignore[attr-defined]
    return op


VectorizedOp = Callable[[Example, Draws], Example]


def with_vectorized(op: Op, vectorized: VectorizedOp) -> Op:
    """Gives the per-example op `op` a vectorised form, `vectorized(batch, draws) -> batch`.

    The vectorised form does to a stacked batch (every value with a leading axis L, images
    `[L, H, W, C]`) what `op` does to each example, drawing its randomness from `draws`
    (`vmoe_data.Draws`: numbers per example, whatever the batch) instead of `rng`. Pipelines use
    it when the split is held in memory and every op of the spec has one: one numpy call per
    batch instead of one Python call per example. Deterministic ops must give what `op` gives;
    random ops the same distribution (their draws differ from the per-example path's).
    """
    op.vectorized = vectorized  # type: ignore[attr-defined]
    return op


def _is_batch_op(op: Op) -> bool:
    return bool(getattr(op, "batched", False))


class Preprocess:
    """A parsed pp spec: per-example ops, then batch ops.

    Attributes:
      spec: the spec as text (callables shown by name).
      example_ops: [(text, op)] applied by `__call__`, in order.
      batch_ops: [(text, op)] applied by `apply_batch`, in order.
    """

    def __init__(self, ops: Sequence[tuple[str, Op]]) -> None:
        self.example_ops: list[tuple[str, Op]] = []
        self.batch_ops: list[tuple[str, Op]] = []
        for text, op in ops:
            if _is_batch_op(op):
                self.batch_ops.append((text, op))
            elif self.batch_ops:
                raise ValueError(
                    f"pp op {text!r} works on single examples but comes after the batch op "
                    f"{self.batch_ops[-1][0]!r}; put batch ops (e.g. mixup) last"
                )
            else:
                self.example_ops.append((text, op))
        self.spec = "|".join(text for text, _ in ops)

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        """Applies the per-example ops to one example (a dict of numpy values)."""
        for _, op in self.example_ops:
            example = op(example, rng)
        return example

    @property
    def vectorizable(self) -> bool:
        """True if every per-example op has a vectorised form (see `with_vectorized`)."""
        return all(hasattr(op, "vectorized") for _, op in self.example_ops)

    def apply_vectorized(self, batch: Example, key: int, ids: np.ndarray) -> Example:
        """The per-example ops' vectorised forms on a stacked batch; row j is the example with
        stream id `ids[j]`, and op k draws from `Draws(key, ids, stream=k)`."""
        for stream, (_, op) in enumerate(self.example_ops):
            batch = op.vectorized(batch, Draws(key, ids, stream))  # type: ignore[attr-defined]
        return batch

    def apply_batch(self, batch: Example, rng: np.random.Generator) -> Example:
        """Applies the batch ops to a batch (a dict of arrays with leading axis B)."""
        for _, op in self.batch_ops:
            batch = op(batch, rng)
        return batch

    def __repr__(self) -> str:
        return f"Preprocess({self.spec!r})"


PPSpec = str | Sequence[str | Op] | Preprocess | None


def preprocess(spec: PPSpec) -> Preprocess:
    """Parses a pp spec (string, list of strings/ops, `Preprocess`, or None for no ops)."""
    if isinstance(spec, Preprocess):
        return spec
    if spec is None:
        return Preprocess([])
    if isinstance(spec, str):
        items: list[str | Op] = [part for part in _split_spec(spec) if part.strip()]
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise ValueError(
            f"pp spec {spec!r} must be a string like 'decode|resize(32)', a list of op "
            "strings or callables, or None"
        )
    ops: list[tuple[str, Op]] = []
    for item in items:
        if isinstance(item, str):
            ops.append((item.strip(), _build_op(item)))
        elif callable(item):
            ops.append((getattr(item, "__name__", repr(item)), item))
        else:
            raise ValueError(f"pp spec item {item!r} must be an op string or a callable")
    return Preprocess(ops)


def _split_spec(spec: str) -> list[str]:
    """Splits a spec at the `|` that are outside parentheses, brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(spec):
        if quote:
            quote = "" if char == quote and spec[i - 1] != "\\" else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return parts


def _parse_op(text: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """`'resize(32, method="nearest")'` -> `("resize", (32,), {"method": "nearest"})`."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        node = None
    if isinstance(node, ast.Name):
        return node.id, (), {}
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and all(k.arg is not None for k in node.keywords)
    ):
        try:
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(
                f"pp op {text.strip()!r}: arguments must be Python literals "
                "(numbers, strings, tuples, lists, dicts, True/False/None)"
            ) from None
        return node.func.id, args, kwargs  # type: ignore[return-value]
    raise ValueError(
        f"bad pp op {text.strip()!r}; expected `name` or `name(args)`, e.g. 'resize(32)'"
    )


def _build_op(text: str) -> Op:
    """The op for one spec item, e.g. `_build_op("resize(32)")`, with its arguments checked."""
    from vmoe_data.registry import PP_OPS  # the registry imports the built-in ops

    name, args, kwargs = _parse_op(text)
    factory = PP_OPS.factory(name)  # unknown names: ValueError listing the installed ops
    try:
        signature = inspect.signature(factory)
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ValueError(f"pp op {text.strip()!r}: {error}; signature: {name}{signature}") from None
    except ValueError:  # no signature to check against: let the call decide
        pass
    try:
        return factory(*args, **kwargs)
    except (TypeError, ValueError) as error:  # a safety net for factories that check less
        message = str(error)
        if not message.startswith(f"{name}: "):
            message = f"{name}: {message}"
        raise ValueError(f"pp op {text.strip()!r}: {message}") from None
