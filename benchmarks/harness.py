"""Timing and memory helpers shared by the vmoe benchmarks.

Times are medians of `repeats` runs after `warmup` runs of a jitted function (compile excluded).
Memory is XLA's buffer assignment for the compiled program (`memory_analysis()`): arguments,
outputs and temporaries, a reproducible figure for "how much memory this step needs".
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def time_ms(fn: Callable, *args: Any, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time in ms of `fn(*args)` (jit it first), results blocked on."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_interleaved_ms(
    calls: Sequence[tuple[Callable, tuple]], repeats: int = 7, warmup: int = 2
) -> list[float]:
    """Median wall times in ms of several jitted `(fn, args)` calls, timed in turns (one run of
    each per round), so that a ratio between them sees the same machine load on a shared host."""
    for fn, args in calls:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for (fn, args), times in zip(calls, samples, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(times) for times in samples]


def planned_bytes(compiled: Any) -> int:
    """What a compiled program plans to hold per device: arguments + outputs + XLA's temporary
    buffers - the outputs that reuse donated arguments.

    XLA's own `peak_memory_in_bytes` leaves the temporaries out on the CPU backend (checked
    with jax 0.10.2), so this adds them up instead: an upper bound on what is live at once.
    """
    stats = compiled.memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def peak_memory_mb(jitted: Callable, *args: Any) -> float:
    """Memory (MB) of the compiled program (`planned_bytes`)."""
    return planned_bytes(jitted.lower(*args).compile()) / 2**20


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Prints rows as an aligned text table with the given columns."""

    def fmt(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def environment() -> dict[str, Any]:
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def write_json(path: str, results: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": environment(), **results}, f, indent=2)
    print(f"wrote {path}")
