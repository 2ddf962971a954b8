"""tune_cpu_malloc: large blocks come from the reusable heap, not fresh mmaps, once applied.

Checked in a fresh process each (the setting is process-wide) through glibc's own accounting
(mallinfo2: hblkhd = bytes in mmapped blocks, arena = bytes of the heap), around one
256 MB block, about one MoE layer's expert-weight gradients at S/32, E=32.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

import vmoe_layers as vl
from vmoe_layers import host

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc malloc only",
)

PROBE = """
import ctypes, json, sys
import vmoe_layers.host as host

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
applied = host.tune_cpu_malloc() if sys.argv[1] == "tuned" else None
before = libc.mallinfo2()
block = libc.malloc(256 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped_during": during.hblkhd - before.hblkhd,
                  "heap_after_free": after.arena}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def test_default_glibc_maps_large_blocks_and_gives_them_back():
    # The behaviour tune_cpu_malloc exists to change; if glibc ever stops doing this, the
    # tuning (and its docs) should be revisited.
    result = _probe("default")
    assert result["mmapped_during"] >= 256 << 20
    assert result["heap_after_free"] < 256 << 20


def test_tuned_malloc_serves_large_blocks_from_the_heap_and_keeps_them():
    result = _probe("tuned")
    assert result["applied"] is True
    assert result["mmapped_during"] == 0
    assert result["heap_after_free"] >= 256 << 20  # kept for the next step's buffers


def test_tune_cpu_malloc_is_exported_and_idempotent():
    assert vl.tune_cpu_malloc is host.tune_cpu_malloc
    assert _probe("tuned")["applied"] is True
