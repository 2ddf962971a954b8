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
"""

from __future__ import annotations

import dataclasses
import math
import re

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
    def result_bytes(self) -> int:
        return sum(DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in self.shapes)

    def bytes_sent(self) -> float:
        """Bytes one device sends (see the module docstring for the model)."""
        n, b = self.group_size, self.result_bytes
        if n <= 1:
            return 0.0
        if self.kind == "reduce-scatter":
            b *= n  # the result is one device's 1/n of the operand
        if self.kind == "collective-permute":
            return float(b)
        factor = 2.0 if self.kind == "all-reduce" else 1.0
        return factor * b * (n - 1) / n


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
