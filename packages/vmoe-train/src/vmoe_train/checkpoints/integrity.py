"""Is a checkpoint intact, and when reading it fails, whose fault is it?

Fingerprints. OCDBT and zarr check their own structure but not the array bytes: a flipped bit
in a data file restores silently as a wrong value. So every array of a saved state gets a 32-bit
fingerprint (an integer sum of mixed bits, the same whatever the sharding, computed on the
devices holding the arrays), saved beside it and checked after every restore.

Failures. A read can fail because the checkpoint is corrupt (a checksum mismatch, bytes that do
not decode, a file shorter than its index says, a missing part), because storage cannot serve
it now (an I/O error, a timeout, an unavailable or overloaded store, no permission), or because
the request does not fit the checkpoint (a target of other shapes or structure: the caller's
error). Only the first makes a checkpoint skippable; the second must never make a run fall
back to an older step (it would then outrun, and lose, the newer one): it is retried, then
raised; the third is raised at once. `classify` tells them apart from the exception chain: our
own `CorruptCheckpointError`, TensorStore's status codes (the first word of its messages) and
Python's exception types; anything unrecognised is "error", raised without skipping anything.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

FINGERPRINT_ALGORITHM = "fmix32-sum-v1"

Verdict = Literal["corrupt", "unavailable", "error"]


class CorruptCheckpointError(ValueError):
    """A restored array does not match its saved fingerprint."""


# TensorStore (absl) status codes that say the stored bytes are wrong: they do not decode, are
# shorter than the index says, or are missing.
CORRUPT_CODES = (
    "DATA_LOSS",
    "OUT_OF_RANGE",
    "FAILED_PRECONDITION",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
)
# Codes that say storage cannot serve the bytes now (absl maps EIO, ETIMEDOUT, EACCES... here).
UNAVAILABLE_CODES = (
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "CANCELLED",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "INTERNAL",
    "UNKNOWN",
)
# Python exceptions that say the structure is wrong (a missing file or directory of a committed
# checkpoint, JSON that does not parse, a tree that does not match its metadata).
_CORRUPT_TYPES = (
    CorruptCheckpointError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    json.JSONDecodeError,
    UnicodeDecodeError,
)


def classify(error: BaseException) -> Verdict:
    """ "corrupt", "unavailable" (cannot be read now) or "error" (anything else: the request
    does not fit the checkpoint, a bug) for the exception a read raised."""
    for e in _chain(error):
        code = _status_code(e)
        if code in CORRUPT_CODES:
            return "corrupt"
        if code in UNAVAILABLE_CODES:
            return "unavailable"
        if isinstance(e, _CORRUPT_TYPES):
            return "corrupt"
        if isinstance(e, OSError):  # EIO, timeouts, connection errors, ...
            return "unavailable"
    return "error"


def _status_code(e: BaseException) -> str:
    word = str(e).strip().split(":", 1)[0]
    return word if word.isupper() and word.replace("_", "").isalpha() else ""


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and its causes, root cause last (at most 9)."""
    chain = [e]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None:
        if cause in chain or len(chain) > 8:
            break
        chain.append(cause)
    return chain


def reason(e: BaseException) -> str:
    """One line saying why a read failed: the root cause's type and first line."""
    root = _chain(e)[-1]
    text = (str(root).strip().splitlines() or [""])[0]
    for cut in (" [tensorstore_spec=", " See full TensorStore details"):
        text = text.split(cut, 1)[0]
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


# ---------------------------------------------------------------------------------------------
# Reading quietly.


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a read failed: `verdict` (see `classify`), `reason` (one line)."""

    verdict: Verdict
    reason: str


def attempt(read: Callable[[Any], Any], path: Any) -> tuple[bool, Any]:
    """(True, read(path)), or (False, the `Failure` saying why it failed).

    When orbax fails to read a checkpoint, it closes its event loop with reads still in flight:
    as they complete (in TensorStore's threads, up to seconds later on a busy machine) and as the
    dead coroutines are collected, Python reports "Exception ignored" (`sys.unraisablehook`):
    echoes of the failure, which is already reported (the reason, then a `CheckpointWarning` or
    `CheckpointError`). No wait is long enough to see the last of them, so reading installs,
    once per process, a hook in front of the current one that drops these echoes
    (`_is_orbax_echo`) and passes every other unraisable exception on.
    """
    _drop_orbax_echoes()
    try:
        return True, read(path)
    except Exception as e:
        failure = Failure(classify(e), reason(e))  # `e` (holding orbax's dead coroutines) goes
    gc.collect()  # their echoes now, while this failure is the one being reported
    return False, failure


def _drop_orbax_echoes() -> None:
    """Puts a `sys.unraisablehook` that drops orbax's echoes in front of the current hook,
    unless the current hook is one already."""
    current = sys.unraisablehook
    if getattr(current, "drops_orbax_echoes", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_orbax_echo(unraisable):
            current(unraisable)

    hook.drops_orbax_echoes = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _is_orbax_echo(unraisable: Any) -> bool:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    files = [getattr(code, "co_filename", "")]
    tb = unraisable.exc_traceback
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return any("orbax" in f or "tensorstore" in f for f in files)


# ---------------------------------------------------------------------------------------------
# Array fingerprints: a 32-bit integer per array, independent of its sharding.

_GOLDEN = 0x9E3779B9  # the index is mixed in so that moved values change the fingerprint too


def _bits_dtype(dtype: np.dtype) -> Any:
    """The unsigned integer type of the same width as `dtype` (None: not fingerprinted)."""
    if dtype == np.bool_:
        return np.uint8
    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}.get(dtype.itemsize)


def _mix(xp: Any, bits: Any, index: Any) -> Any:
    """murmur3's 32-bit finaliser of (bits ^ index * golden): a bijection of the bits, so one
    changed value always changes the (wrapping) sum."""
    h = bits ^ (index * xp.uint32(_GOLDEN))
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _fingerprint_jax(x: jax.Array) -> jax.Array:
    """Traced: the uint32 fingerprint of one array, elementwise then a sum (no reshape, so a
    sharded array is never gathered)."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint8)
    else:
        bits = jax.lax.bitcast_convert_type(x, _bits_dtype(np.dtype(x.dtype)))
    bits = bits.astype(jnp.uint32)  # 8-byte types: a trailing axis of 2 words
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    return jnp.sum(_mix(jnp, bits, index), dtype=jnp.uint32)


def _fingerprint_np(x: np.ndarray) -> int:
    """The same as `_fingerprint_jax`, on the host."""
    flat = np.ascontiguousarray(x).reshape(-1)
    bits = flat.astype(np.uint8) if x.dtype == np.bool_ else flat.view(_bits_dtype(x.dtype))
    bits = bits.reshape(*x.shape, 2) if bits.size == 2 * x.size else bits.reshape(x.shape)
    bits = bits.astype(np.uint32)
    index = np.arange(bits.size, dtype=np.uint64).astype(np.uint32).reshape(bits.shape)
    with np.errstate(over="ignore"):
        return int(np.sum(_mix(np, bits, index), dtype=np.uint32))


_fingerprint_all = jax.jit(lambda xs: [_fingerprint_jax(x) for x in xs])


def _leaf_name(path: tuple) -> str:
    """A leaf's name, e.g. params/block_1/moe/experts/w_in: the same whether "params" is a
    TrainState field or a dict key (`restore_params` reads it as the latter)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(getattr(k, "key", k)))
    return "/".join(parts)


def _fingerprintable(x: Any) -> bool:
    try:
        return _bits_dtype(np.dtype(x.dtype)) is not None
    except (AttributeError, TypeError):  # not an array, or a typed PRNG key
        return False


def fingerprints(tree: Any) -> dict[str, dict]:
    """{leaf name: {"dtype", "shape", "fingerprint"}} of every array leaf of `tree`: jax arrays
    in one jit on their own devices, numpy arrays on the host."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    named = [(_leaf_name(p), x) for p, x in leaves if _fingerprintable(x)]
    on_device = [(n, x) for n, x in named if isinstance(x, jax.Array)]
    values = {n: _fingerprint_np(np.asarray(x)) for n, x in named if not isinstance(x, jax.Array)}
    if on_device:
        sums = jax.device_get(_fingerprint_all([x for _, x in on_device]))
        values.update({n: int(s) for (n, _), s in zip(on_device, sums, strict=True)})
    return {
        n: {"dtype": np.dtype(x.dtype).name, "shape": list(np.shape(x)), "fingerprint": values[n]}
        for n, x in named
    }


def verify(tree: Any, checksums: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first array of `tree` whose fingerprint differs from the
    saved one (arrays restored with another dtype or shape are not compared)."""
    if checksums.get("algorithm") != FINGERPRINT_ALGORITHM:
        return
    saved = checksums.get("arrays", {})
    wanted = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _leaf_name(path)
        entry = saved.get(name)
        if (
            entry is not None
            and _fingerprintable(x)
            and entry["dtype"] == np.dtype(x.dtype).name
            and entry["shape"] == list(np.shape(x))
        ):
            wanted[name] = x
    actual = fingerprints(wanted)
    for name in wanted:
        if actual[name]["fingerprint"] != saved[name]["fingerprint"]:
            raise CorruptCheckpointError(
                f"array {name!r} does not match its saved checksum (the data file is corrupt)"
            )
