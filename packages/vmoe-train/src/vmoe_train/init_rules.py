r"""Initialisation rules: a new model's parameters from another checkpoint's, path by path.

    rules = [
        Rule(r"head/.*", "", "drop"),                                  # new classes: fresh head
        Rule(r"(block_[13])/mlp/(.+)", r"\1/moe/experts/\2", "tile"),  # dense MLP -> E experts
        Rule(r"pos_embedding", "pos_embedding", "zoom"),               # 224 px -> 384 px
        Rule(r"(.+)", r"\1"),                                          # the rest as it is
    ]
    loaded = apply_rules(rules, source, target, keep_fresh=r"head/.*|block_\d+/moe/router/.*")

`source` is the checkpoint and `target` the new model, both flat: "/"-joined path -> leaf (as
`flax.traverse_util.flatten_dict(params, sep="/")`). Source leaves are arrays (host NumPy, as
loaded); target leaves need only `.shape` and `.dtype` (fresh parameters, or the
`jax.ShapeDtypeStruct`s of `jax.eval_shape`). With a dense ViT-Nano/4 checkpoint and a V-MoE-Nano/4
(E=4 experts in block 1) target, the rules above send

    block_1/mlp/w_in  [32, 64]      --tile-->  block_1/moe/experts/w_in  [4, 32, 64]
    pos_embedding     [1, 1+4*4, 32] --zoom--> pos_embedding             [1, 1+6*6, 32]
    block_0/mlp/w_in  [32, 64]      --copy-->  block_0/mlp/w_in          [32, 64]

and leave out head/* and block_1/moe/router/gate: the caller keeps their fresh values.

In a config, rules are plain tuples, (source, target) or (source, target, transform):
`(("head/.*", "", "drop"), (r"(.+)", r"\1"))`; `parse_rules` turns them into `Rule`s.

Matching: each source path is matched (`re.fullmatch`) against the rules in order; the first
that matches wins and names the target, `match.expand(rule.target)` (`\1`, `\g<name>`). Its
transform, `transform(x, target_shape, target_dtype) -> array`, makes the target's array; the
result is cast to the target's dtype and must have its shape. Built-in transforms (plugins add
more through the hook `vmoe_train_init_transforms`, see `vmoe_train.hookspecs`):

  copy  the array as it is (the shapes must be equal).
  tile  sparse upcycling: [a, b, ...] -> [E, a, b, ...], E copies along a new leading expert
        axis. A source that already has the target's shape is refused (an expert stack
        already: copy it); so is any other shape but [E, *source shape].
  zoom  position embeddings [1, T, D] -> [1, T', D]: the square patch grid resized by linear
        interpolation along each side, corners aligned (output cell i samples the old grid at
        i * (n - 1) / (m - 1)), as the V-MoE release's "vit_zoom" (scipy.ndimage.zoom, order 1).
        T is n^2 (no class token) or n^2 + 1 (the class token's row first, kept as it is); T'
        likewise, with a class token exactly when the source has one. Not
        `vmoe_train.resize_pos_embedding`, which samples at half-pixel centres (jax.image.resize)
        and so gives other values for the same grids.
  drop  the source is left behind on purpose: no target (the rule's target is "").

The result: target path -> NumPy array (target order) for every target a rule produced; a copy
may share memory with its source. A target no rule produced keeps its fresh initialisation:
any target with `unmatched="init"`; with "error" (default) only those that fullmatch
`keep_fresh` (the routers, a new head). A source no rule matches is always an error (a "drop"
rule leaves one behind). Every problem of a call -- each source no rule matches or sent where the
model has no parameter, each target produced twice or not at all, each transform that refused
or gave the wrong shape -- is listed, by its paths, in one `InitRulesError`.

From the release (google-research/vmoe, vmoe/initialization/{mapping,rules}.py): ordered
(regex, replacement[, transform]) rules, first match wins, unmatched sources and targets are
errors unless told otherwise, "expand_tile" and "vit_zoom". Here rules fullmatch instead of
searching, "drop" is named (the release drops on an empty replacement), "tile" always adds the
leading expert axis (the release's takes an axis and a count), "zoom" refuses to add or remove a
class token (the release invents or discards one), and every problem comes in one error.

Sparse upcycling (`upcycle_rules`) and step 0: an upcycled MoE layer's output for a token is
sum_k w_k * MLP(x) over the experts it reached, all copies of the dense MLP, so the deterministic
forward equals the dense model's exactly when no choice is dropped and each token's combine
weights sum to 1: top_k or bpr with `normalize_weights=True` (any K) and capacity_factor >= E/K
(capacity C = S: room for every choice), whatever the router's init; also top_k with k = E,
or the hash router (vmoe-router-hash: weights 1/K) at capacity_factor >= E/K. With V-MoE's raw
softmax weights and K < E, a token's MoE output is (its K gates' sum, < 1) * MLP(x) (tested);
a zero gate would tie every logit, so every token would pick the same K experts. Measured on
V-MoE-Nano/4: pre-logits equal to 1e-5 for top_k k=2 of 4 normalised, k = E, and hash; off by
0.23 (fresh gate) and 0.67 (zero gate) for raw top_k k=2 of E=4.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np

import vmoe_plugins
from vmoe_train.mismatch import TreeMismatchError

# transform(x, target_shape, target_dtype) -> the target's array (host NumPy).
Transform = Callable[[np.ndarray, tuple[int, ...], Any], np.ndarray]

TRANSFORMS: vmoe_plugins.Registry[np.ndarray] = vmoe_plugins.Registry(
    "vmoe_train_init_transforms", "init transform"
)

DROP = "drop"
UNMATCHED = ("error", "init")
POS_EMBEDDING = "pos_embedding"
# The routers of an upcycled V-MoE: not in the dense checkpoint, they start fresh.
UPCYCLE_KEEP_FRESH = r"block_\d+/moe/router/.*"


@dataclasses.dataclass(frozen=True)
class Rule:
    r"""Sources that fullmatch `source` go to `match.expand(target)` through `transform`.

    Attributes:
      source: a regex over source paths, e.g. r"(block_\d+)/mlp/(.+)".
      target: the target path template, e.g. r"\1/moe/experts/\2"; "" for a "drop" rule (and
        only for one).
      transform: the name of a registered transform ("copy", "tile", "zoom", "drop", plugins').
    """

    source: str
    target: str
    transform: str = "copy"
    pattern: re.Pattern[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("source", "target", "transform"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"rule {self}: {name} must be a string")
        if not self.transform:
            raise ValueError(f"rule {self}: transform must be a name, e.g. 'copy'")
        try:
            object.__setattr__(self, "pattern", re.compile(self.source))
        except re.error as error:
            raise ValueError(f"rule {self}: source is not a regex: {error}") from None
        if self.transform == DROP and self.target:
            raise ValueError(f"rule {self}: a {DROP!r} rule has no target; write ''")
        if self.transform != DROP and not self.target:
            raise ValueError(
                f"rule {self}: the target template is empty; to leave the matched sources "
                f"behind, use the transform {DROP!r}"
            )

    def __str__(self) -> str:
        return repr((self.source, self.target, self.transform))


def parse_rules(rules: Iterable[Rule | Sequence[str]]) -> tuple[Rule, ...]:
    """`Rule`s from rules and (source, target) / (source, target, transform) tuples (a config's).

    Names are not looked up here (`apply_rules` does): plugins may register theirs later.
    """
    if isinstance(rules, str | Rule):
        raise ValueError(f"rules must be a sequence of rules, not {rules!r}; e.g. ({rules!r},)")
    parsed = []
    for index, rule in enumerate(rules):
        if isinstance(rule, Rule):
            parsed.append(rule)
        elif isinstance(rule, tuple | list) and len(rule) in (2, 3):
            try:
                parsed.append(Rule(*rule))
            except ValueError as error:
                raise ValueError(f"rule {index}: {error}") from None
        else:
            raise ValueError(
                f"rule {index} is {rule!r}; a rule is a Rule, (source, target) or "
                "(source, target, transform)"
            )
    return tuple(parsed)


def available_transforms() -> list[str]:
    """Names of every installed init transform (built-ins and plugins), sorted."""
    return TRANSFORMS.names()


class InitRulesError(TreeMismatchError):
    """Init rules that do not fit the checkpoint and the model: every problem, by its paths.

    Attributes:
      problems: one line per problem, as in the message.
      missing: target paths that no rule produced (and `keep_fresh` does not match).
      extra: source paths that no rule matches, or that a rule sent to a path the model lacks.
      mismatched: (source path, source shape, target shape) whose transform refused the shapes
        or gave another shape.
      duplicates: target path -> the source paths that rules sent there (two or more).
    """

    def __init__(
        self,
        problems: Sequence[str],
        missing: Sequence[str],
        extra: Sequence[str],
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
        duplicates: Mapping[str, Sequence[str]],
    ) -> None:
        super().__init__(missing, extra, mismatched)
        self.problems = list(problems)
        self.duplicates = {path: list(sources) for path, sources in duplicates.items()}
        # The base message names paths only; ours names the rule behind each problem too.
        self.args = (
            f"the init rules do not fit the checkpoint to the model ({len(problems)} "
            "problem(s)):\n  " + "\n  ".join(self.problems),
        )


def apply_rules(
    rules: Iterable[Rule | Sequence[str]],
    source: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    unmatched: str = "error",
    keep_fresh: str = "",
) -> dict[str, np.ndarray]:
    """The target arrays that `rules` make from `source` (see the module docstring).

    Args:
      rules: `Rule`s or tuples, in order: the first whose source regex fullmatches a path wins.
      source: checkpoint path -> array.
      target: model path -> leaf with `.shape` and `.dtype`.
      unmatched: "error" (a target no rule produced is an error unless it fullmatches
        `keep_fresh`) or "init" (any such target is left out, to keep its fresh value).
      keep_fresh: regex of the targets that start fresh on purpose, e.g. UPCYCLE_KEEP_FRESH.

    Returns:
      target path -> NumPy array of the target's shape and dtype, for the targets produced.

    Raises:
      ValueError: a malformed rule, an unknown transform (listing the installed ones) or a bad
        `unmatched` / `keep_fresh`, before any array is read.
      InitRulesError: every problem of the mapping at once (module docstring).
    """
    rules = parse_rules(rules)
    vmoe_plugins.check_choice("unmatched", unmatched, UNMATCHED)
    try:
        fresh = re.compile(keep_fresh) if keep_fresh else None
    except re.error as error:
        raise ValueError(f"keep_fresh={keep_fresh!r} is not a regex: {error}") from None
    transforms = {rule.transform: TRANSFORMS.factory(rule.transform) for rule in rules}

    problems: list[str] = []
    extra: list[str] = []
    planned: dict[str, list[tuple[str, int]]] = {}  # target path -> [(source path, rule index)]
    for path in sorted(source):
        index = next((i for i, rule in enumerate(rules) if rule.pattern.fullmatch(path)), None)
        if index is None:
            extra.append(path)
            problems.append(
                f"source {path} {_shape(source[path])}: no rule matches it (add a rule, or "
                f"({re.escape(path)!r}, '', {DROP!r}) to leave it behind)"
            )
            continue
        rule = rules[index]
        if rule.transform == DROP:
            continue
        dest = _expand(rule, index, path)
        if dest not in target:
            extra.append(path)
            problems.append(
                f"source {path}: rule {index} {rule} sends it to {dest}, which is not a "
                "parameter of the model"
            )
            continue
        planned.setdefault(dest, []).append((path, index))

    duplicates = {dest: [p for p, _ in froms] for dest, froms in planned.items() if len(froms) > 1}
    for dest, froms in duplicates.items():
        listed = ", ".join(f"{p} (rule {i})" for p, i in planned[dest])
        problems.append(f"target {dest}: produced by {len(froms)} sources: {listed}")

    produced: dict[str, np.ndarray] = {}
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for dest, [(path, index)] in ((d, f) for d, f in planned.items() if len(f) == 1):
        rule, like = rules[index], target[dest]
        x, shape, dtype = np.asarray(source[path]), tuple(like.shape), np.dtype(like.dtype)
        where = f"rule {index} {rule} on {path} -> {dest}"
        try:
            out = np.asarray(transforms[rule.transform](x, shape, dtype))
            if out.shape != shape:
                raise ValueError(f"{rule.transform!r} gave shape {out.shape}")
        except ValueError as error:
            mismatched.append((path, x.shape, shape))
            problems.append(f"source {path} {x.shape} -> target {dest} {shape}: {where}: {error}")
            continue
        except Exception as error:  # a transform's bug, not a shape it refused: its traceback
            error.add_note(f"while applying {where}")
            raise
        produced[dest] = out.astype(dtype, copy=False)

    missing = [
        path
        for path in target
        if path not in planned
        and unmatched == "error"
        and not (fresh is not None and fresh.fullmatch(path))
    ]
    for path in missing:
        problems.append(
            f"target {path} {_shape(target[path])}: no rule produces it (add a rule, or keep "
            "it fresh: keep_fresh=<regex>, unmatched='init')"
        )
    if problems:
        raise InitRulesError(problems, missing, extra, mismatched, duplicates)
    return {path: produced[path] for path in target if path in produced}


def _expand(rule: Rule, index: int, path: str) -> str:
    match = rule.pattern.fullmatch(path)
    assert match is not None
    try:
        return match.expand(rule.target)
    except (re.error, IndexError) as error:  # a group the source regex does not have
        raise ValueError(
            f"rule {index} {rule}: the target template does not fit the source regex: {error}"
        ) from None


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(np.shape(leaf))


def copy_array(x: np.ndarray, target_shape: tuple[int, ...], target_dtype: Any) -> np.ndarray:
    """ "copy": the source as it is (`apply_rules` checks its shape is the target's)."""
    return x


def tile_experts(x: np.ndarray, target_shape: tuple[int, ...], target_dtype: Any) -> np.ndarray:
    """ "tile": [a, b, ...] -> [E, a, b, ...], E copies of the source on a new leading axis."""
    target_shape = tuple(target_shape)
    if x.shape == target_shape:
        raise ValueError(
            f"tile adds a leading expert axis, but the source has the target's shape already "
            f"{x.shape} (an expert stack already? then 'copy' it)"
        )
    if target_shape[1:] != x.shape:
        raise ValueError(
            f"tile makes [E, *source shape]: a source {x.shape} tiles to (E, "
            f"{', '.join(map(str, x.shape))}), not to {target_shape}"
        )
    return np.repeat(x[None], target_shape[0], axis=0)


def zoom_pos_embedding(
    x: np.ndarray, target_shape: tuple[int, ...], target_dtype: Any
) -> np.ndarray:
    """ "zoom": position embeddings [1, T, D] -> [1, T', D] (module docstring), in float64."""
    target_shape = tuple(target_shape)
    if x.ndim != 3 or len(target_shape) != 3 or x.shape[0] != 1 or target_shape[0] != 1:
        raise ValueError(
            f"zoom resizes position embeddings [1, T, D]; got {x.shape} -> {target_shape}"
        )
    if x.shape[2] != target_shape[2]:
        raise ValueError(f"zoom keeps the width D: {x.shape[2]} != {target_shape[2]}")
    token, n = _token_and_side(x.shape[1])
    target_token, m = _token_and_side(target_shape[1])
    if token != target_token:
        has = {True: "has a class token", False: "has none"}
        raise ValueError(
            f"zoom keeps the class token's row: the source ({x.shape[1]} tokens) {has[token]}, "
            f"the target ({target_shape[1]} tokens) {has[target_token]}"
        )
    first = int(token)
    grid_nnd = np.asarray(x[0, first:], np.float64).reshape(n, n, -1)
    grid_mmd = _linear_resize(_linear_resize(grid_nnd, m, axis=0), m, axis=1)
    rows = [np.asarray(x[0, :first], np.float64), grid_mmd.reshape(m * m, -1)]
    return np.concatenate(rows)[None]


def drop_source(x: np.ndarray, target_shape: tuple[int, ...], target_dtype: Any) -> NoReturn:
    """ "drop": never called; a drop rule has no target, and `apply_rules` skips its sources."""
    raise ValueError(f"{DROP!r} makes no array: a {DROP!r} rule leaves its sources behind")


def _token_and_side(tokens: int) -> tuple[bool, int]:
    """T = n^2 -> (False, n); T = n^2 + 1 -> (True, n) (a square is read as having no token)."""
    for token in (False, True):
        side = math.isqrt(max(tokens - token, 0))
        if side >= 1 and side * side == tokens - token:
            return token, side
    raise ValueError(
        f"{tokens} tokens are not a square patch grid (n^2) nor one with a class token "
        "(n^2 + 1); zoom resizes square grids only"
    )


def _linear_resize(x: np.ndarray, new: int, axis: int) -> np.ndarray:
    """Linear interpolation of `x` to `new` entries along `axis`, first and last entries kept
    (align corners): entry i samples the old axis at i * (old - 1) / (new - 1)."""
    old = x.shape[axis]
    position = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
    low = np.minimum(np.floor(position).astype(int), old - 1)
    high = np.minimum(low + 1, old - 1)
    weight = (position - low).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return np.take(x, low, axis) * (1 - weight) + np.take(x, high, axis) * weight


def upcycle_rules(moe_blocks: Iterable[int]) -> tuple[Rule, ...]:
    r"""Rules that start a V-MoE from the checkpoint of its dense twin (sparse upcycling).

    The twin has the same sizes and names with a dense MLP in every block
    (`vmoe_layers.create_model("ViT-Mu/2")` for "V-MoE-Mu/2", or the V-MoE name with
    `moe_layers=()`). In each MoE block i every expert starts as block i's MLP
    (block_i/mlp/<p> [...] --tile--> block_i/moe/experts/<p> [E, ...]); the position embeddings
    are zoomed (to a new resolution, or the same values at the same one); every other parameter
    is copied. The routers are not in the checkpoint: apply with `keep_fresh=UPCYCLE_KEEP_FRESH`
    (which router init keeps step 0 exact: the module docstring). For a new head, put
    `Rule("head/.*", "", "drop")` first and keep "head/.*" fresh too.

    Args:
      moe_blocks: the V-MoE's MoE blocks, `model.moe_blocks()` (e.g. (1, 3) for "every-2" of 4).
    """
    blocks = sorted({vmoe_plugins.check_int("moe block", block, low=0) for block in moe_blocks})
    tiled = [Rule(rf"block_{i}/mlp/(.+)", rf"block_{i}/moe/experts/\1", "tile") for i in blocks]
    return (*tiled, Rule(POS_EMBEDDING, POS_EMBEDDING, "zoom"), Rule(r"(.+)", r"\1"))
