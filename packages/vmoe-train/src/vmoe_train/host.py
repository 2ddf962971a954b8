"""Host (CPU) memory allocator tuning for XLA:CPU training loops.

XLA:CPU gets every output and temporary buffer of a step from the C allocator. glibc's malloc
serves blocks over 32 MB with a fresh mmap and unmaps them on free, so each step page-faults
its large buffers in again (parameter gradients above all). MoE layers have E/K times the
parameters of the dense MLP they replace, so they pay this E/K times over. Measured on a 2-core
CPU with jax 0.10.2 (benchmarks/bench_moe_layer.py, three runs): V-MoE-S/32 SGD train step at
batch 32, 15.7-16.4 -> 22.5-25.9 img/s; its ViT twin 36.6-37.0 -> 40.4-44.3 img/s.

`tune_cpu_malloc()` makes glibc keep freed memory for reuse instead: no mmap for large blocks,
one arena, and no trimming below 2 GB. It is opt-in, and lives here in vmoe-train rather than
with the model code: a process-wide setting belongs to the program that runs the training loop,
not to a library it imports. Call it first thing in a script, before jax computes
anything: XLA starts its thread pool at the first computation, and a thread that already has
its own malloc arena keeps mmapping blocks too big for that arena. The environment-variable
form applies before any thread exists, for any program:
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`.
The costs: the process keeps its peak heap instead of returning it to the system, and all
threads share one malloc arena (one lock; fine for XLA's few large allocations a step).
"""

from __future__ import annotations

import ctypes
import platform
import warnings

# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = (
    (_M_ARENA_MAX, 1),
    (_M_MMAP_MAX, 0),
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # mallopt takes a C int: keep up to 2 GB of free heap
)


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def _jax_started() -> bool:
    """Whether jax has created its backends (and with them XLA's thread pool)."""
    try:
        from jax._src import xla_bridge  # no public API says this; best effort

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def tune_cpu_malloc() -> bool:
    """Makes glibc malloc reuse freed memory (see the module docstring); process-wide.

    Returns True when applied, False where it does not apply (not Linux with glibc: macOS,
    Windows and musl have allocators of their own) or glibc refused a setting. Warns when jax has
    already computed: its threads keep their own arenas and only partly benefit. Safe to call
    again.
    """
    libc = _glibc()
    if libc is None:
        return False
    if _jax_started():
        warnings.warn(
            "tune_cpu_malloc() called after jax started computing: XLA's threads that already "
            "have a malloc arena keep mmapping large blocks. Call it before jax computes "
            "anything, or set GLIBC_TUNABLES before the process starts (see vmoe_train.host).",
            RuntimeWarning,
            stacklevel=2,
        )
    for param, value in _SETTINGS:
        if libc.mallopt(param, value) != 1:  # 1 on success
            warnings.warn(f"glibc mallopt({param}, {value}) failed", RuntimeWarning, stacklevel=2)
            return False
    return True
