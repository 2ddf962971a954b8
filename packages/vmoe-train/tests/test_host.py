"""tune_cpu_malloc: large blocks come from the reusable heap, not fresh mmaps, once applied.

Checked in a fresh process each (the setting is process-wide, and the environment is scrubbed of
glibc tunables) through glibc's own accounting (mallinfo2: hblkhd = bytes in mmapped blocks,
arena = bytes of the main heap), around one 256 MB block, about one MoE layer's expert-weight
gradients at S/32, E=32. glibc's mmap threshold never rises above 32 MB on 64-bit systems, so by
default such a block is always mmapped.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest

import vmoe_train
from vmoe_train import host

IS_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
glibc_only = pytest.mark.skipif(
    not (IS_GLIBC and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")),
    reason="glibc >= 2.33 (mallinfo2) only",
)

PROBE = """
import ctypes, json, sys, threading, warnings

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
mode, where = sys.argv[1], sys.argv[2]
if mode != "default":  # glibc as it is: no need to import the trainer (4 s)
    import vmoe_train.host as host
applied = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if mode == "late":  # jax computes first, then the tuning
        import jax.numpy as jnp
        (jnp.ones(4) + 1).block_until_ready()
    if mode == "no-arena-limit":
        host._SETTINGS = tuple(s for s in host._SETTINGS if s[0] != host._M_ARENA_MAX)
    if mode != "default":
        applied = [host.tune_cpu_malloc(), host.tune_cpu_malloc()]  # twice: idempotent

result = {"applied": applied, "warnings": [str(w.message) for w in caught]}

def allocate_and_free():
    before = libc.mallinfo2()
    block = libc.malloc(256 << 20)
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    result["mmapped_during"] = during.hblkhd - before.hblkhd
    result["heap_before"] = before.arena
    result["heap_after_free"] = after.arena

if where == "thread":  # a thread started after the tuning, as XLA's pool is
    worker = threading.Thread(target=allocate_and_free)
    worker.start()
    worker.join()
else:
    allocate_and_free()
print(json.dumps(result))
"""

BLOCK = 256 << 20


def _probe(mode: str, where: str = "main") -> dict:
    env = {
        k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, where],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout)


@glibc_only
def test_default_glibc_maps_large_blocks_and_gives_them_back():
    # The behaviour tune_cpu_malloc exists to change; if glibc ever stops doing this, the
    # tuning (and its docs) should be revisited.
    result = _probe("default")
    assert result["mmapped_during"] >= BLOCK
    assert result["heap_after_free"] < BLOCK


@glibc_only
@pytest.mark.parametrize("where", ["main", "thread"])
def test_tuned_malloc_serves_large_blocks_from_the_heap_and_keeps_them(where):
    result = _probe("tuned", where)
    assert result["applied"] == [True, True]
    assert result["warnings"] == []
    assert result["mmapped_during"] == 0
    # The heap grew to hold the block and keeps it for the next step's buffers.
    assert result["heap_before"] < BLOCK <= result["heap_after_free"]


@glibc_only
def test_without_the_arena_limit_a_new_thread_still_maps_large_blocks():
    # Why arena_max=1 is part of the tuning: threads (XLA's pool) get arenas of their own,
    # whose heaps cannot hold a 256 MB block, so it would be mmapped after all.
    assert _probe("no-arena-limit", "thread")["mmapped_during"] >= BLOCK


@glibc_only
def test_tuning_after_jax_computed_warns_that_it_is_late():
    result = _probe("late")
    assert result["applied"] == [True, True]
    assert any("after jax started computing" in w for w in result["warnings"])


def test_tune_cpu_malloc_does_not_apply_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert vmoe_train.tune_cpu_malloc is host.tune_cpu_malloc
    assert "tune_cpu_malloc" in vmoe_train.__all__
    assert vmoe_train.tune_cpu_malloc() is False


def test_the_model_package_does_not_offer_to_change_the_allocator():
    # A process-wide setting belongs to the program running the training loop (vmoe-train),
    # not to the model code it imports.
    import vmoe_layers

    assert not hasattr(vmoe_layers, "tune_cpu_malloc")
    assert "tune_cpu_malloc" not in vmoe_layers.__all__
