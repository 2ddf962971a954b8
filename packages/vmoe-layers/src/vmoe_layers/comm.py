"""What a compiled program sends between devices, read from its HLO text.

The communication of a sharded step is a property of the compiled program: every collective in
`jax.jit(f).lower(...).compile().as_text()` names its result shape and the groups of devices
it runs over. `collectives(hlo)` lists them; `bytes_sent_per_device(hlo)` adds up, per
collective kind, the bytes one device sends in one run of the program, under the bandwidth-
optimal (ring) algorithms: with n devices in a group and B the bytes of one device's full
operand (all-to-all, reduce-scatter, all-reduce) or of the gathered result (all-gather),

    all-to-all       B * (n - 1) / n     (keeps its own 1/n, sends the rest)
    all-gather       B * (n - 1) / n     (sends its shard to every other device)
    reduce-scatter   B * (n - 1) / n
    all-reduce       2 * B * (n - 1) / n (a reduce-scatter then an all-gather)
    collective-permute  B

Collectives inside loops (`while`) are counted once, so call it on programs without loops
over layers (the vmoe models unroll their blocks). Async pairs (`all-gather-start` /
`-done`) count once, at the start.

What the bytes are for: `bytes_sent_by_role(hlo, n, ParamShapes.of(shardings, params), E)`
attributes each array of each collective to one of `ROLES`, by its shape (XLA may reshape or
transpose a parameter on its way into a collective, so shapes are compared with unit dimensions
dropped and dimensions sorted):

    gradient reduction  an all-reduce / reduce-scatter of a parameter's shape
    parameter gather    an all-gather of a parameter's shape
    expert all-to-all   an explicit `jax.lax.all_to_all` (the expert strategies' exchange)
    statistics          at most `statistic_size` elements (losses, aux losses, expert loads)
    MoE layer arrays    anything else from an operation of a MoE layer (its op_name has
                        "/moe/"): routing arrays, tokens or expert buffers crossing devices
    other arrays        anything else: activations the XLA partitioner moves (e.g. under fsdp
                        it may gather a dense layer's input rather than its weight)

A parameter's shape counts whole, as one device holds it, or anything between (each dimension
whole or split as in its sharding: e.g. an expert stack gathered over 'data' and still split
over 'expert').
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterable
from typing import Any

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_OP = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program.

    Attributes:
      kind: one of `KINDS`.
      shapes: the result arrays as (dtype, dims) pairs (several for a tuple-shaped collective).
      group_size: n, the devices in each of its groups (1: nothing crosses devices).
      line: the HLO instruction, for messages.
    """

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    group_size: int
    line: str

    @property
    def op_name(self) -> str:
        """The jax operation the collective came from (its metadata's op_name; "" if none): an
        explicit `jax.lax.all_to_all` ends in "all_to_all", a collective the XLA partitioner
        inserted names the operation whose operands it moved."""
        match = re.search(r'op_name="([^"]*)"', self.line)
        return match.group(1) if match else ""

    @property
    def result_bytes(self) -> int:
        return sum(DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in self.shapes)

    def bytes_sent(self) -> float:
        """Bytes one device sends (see the module docstring for the model)."""
        return sum(self.bytes_sent_per_array())

    def bytes_sent_per_array(self) -> list[float]:
        """Bytes one device sends for each array of `shapes`, in order."""
        n = self.group_size
        if n <= 1:
            return [0.0] * len(self.shapes)
        sent = []
        for dtype, dims in self.shapes:
            b = DTYPE_BYTES[dtype] * math.prod(dims)
            if self.kind == "reduce-scatter":
                b *= n  # the result is one device's 1/n of the operand
            if self.kind == "collective-permute":
                sent.append(float(b))
                continue
            factor = 2.0 if self.kind == "all-reduce" else 1.0
            sent.append(factor * b * (n - 1) / n)
        return sent


def _group_size(rest: str, num_devices: int) -> int:
    """n from the instruction's replica_groups (or source_target_pairs for a permute)."""
    if match := re.search(r"replica_groups=\{(\{[\d,]*\})", rest):
        return len([d for d in match.group(1).strip("{}").split(",") if d])
    if match := re.search(r"replica_groups=\[([\d,]+)\]<=", rest):  # iota form: [groups, n]
        return int(match.group(1).split(",")[-1])
    if match := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", match.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", match.group(2)))
    if "source_target_pairs=" in rest:
        return 2
    return num_devices  # replica_groups={}: one group of every device


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
    """Every collective instruction of a compiled module's HLO text, in program order."""
    found = []
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if match is None or "-done(" in line:
            continue
        shapes = tuple(
            (m.group("dtype"), tuple(int(d) for d in m.group("dims").split(",") if d))
            for m in _ARRAY.finditer(match.group("shape"))
            if m.group("dtype") in DTYPE_BYTES
        )
        if match.group("kind") == "all-gather" and "all-gather-start(" in line:
            # An async all-gather's start returns (operands, results): keep the results.
            shapes = shapes[len(shapes) // 2 :]
        group_size = _group_size(match.group("rest"), num_devices)
        found.append(Collective(match.group("kind"), shapes, group_size, line.strip()))
    return found


def bytes_sent_per_device(hlo_text: str, num_devices: int) -> dict[str, float]:
    """{kind: bytes one device sends per run} for every kind in `KINDS` (0 where absent)."""
    total = dict.fromkeys(KINDS, 0.0)
    for c in collectives(hlo_text, num_devices):
        total[c.kind] += c.bytes_sent()
    return total


ROLES = (
    "gradient reduction",
    "parameter gather",
    "expert all-to-all",
    "statistics",
    "MoE layer arrays",
    "other arrays",
)


def canonical_shape(dims: Iterable[int]) -> tuple[int, ...]:
    """`dims` up to what XLA may do to an array on its way into a collective: unit dimensions
    dropped, the rest sorted (a [16, 10] kernel reduced as [10, 16], a [1, 17, 16] embedding as
    [17, 16])."""
    return tuple(sorted(d for d in dims if d != 1))


@dataclasses.dataclass(frozen=True)
class ParamShapes:
    """The canonical shapes a parameter may have in a collective (see the module docstring)."""

    shapes: frozenset[tuple[int, ...]]

    @classmethod
    def of(cls, shardings: Any, params: Any) -> ParamShapes:
        """From a pytree of `jax.sharding.Sharding`s and the matching params (arrays or
        `jax.ShapeDtypeStruct`s): each dimension whole or as one device holds it."""
        import jax  # the module's parsing stays importable without jax

        found = set()
        leaves = zip(jax.tree.leaves(shardings), jax.tree.leaves(params), strict=True)
        for sharding, leaf in leaves:
            whole = tuple(leaf.shape)
            shard = tuple(sharding.shard_shape(whole))
            for dims in itertools.product(*({w, s} for w, s in zip(whole, shard, strict=True))):
                found.add(canonical_shape(dims))
        return cls(frozenset(found))

    def __contains__(self, dims: Iterable[int]) -> bool:
        return canonical_shape(dims) in self.shapes


def array_role(
    kind: str, dims: tuple[int, ...], params: ParamShapes, statistic_size: int, op_name: str = ""
) -> str:
    """Which of `ROLES` one array of a collective of `kind` from operation `op_name` plays."""
    if kind == "all-to-all" and op_name.endswith("all_to_all"):
        return "expert all-to-all"
    if math.prod(dims) <= statistic_size:
        return "statistics"
    if dims in params:
        if kind in ("all-reduce", "reduce-scatter"):
            return "gradient reduction"
        if kind == "all-gather":
            return "parameter gather"
    return "MoE layer arrays" if "/moe/" in op_name else "other arrays"


def bytes_sent_by_role(
    hlo_text: str, num_devices: int, params: ParamShapes, statistic_size: int
) -> dict[str, float]:
    """{role: bytes one device sends per run} for every role in `ROLES` (0 where absent);
    `statistic_size` is the most elements a statistic has (e.g. the number of experts)."""
    total = dict.fromkeys(ROLES, 0.0)
    for c in collectives(hlo_text, num_devices):
        for (_, dims), sent in zip(c.shapes, c.bytes_sent_per_array(), strict=True):
            total[array_role(c.kind, dims, params, statistic_size, c.op_name)] += sent
    return total
