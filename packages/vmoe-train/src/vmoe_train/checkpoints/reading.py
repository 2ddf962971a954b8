"""Restoring the newest checkpoint that reads: retry what cannot be read now, skip only what is
corrupt, and with several processes decide together.

    value, step, skipped = restore_latest(directory, None, read)

`read(step_dir)` reads one checkpoint (raising if it cannot). A failure is classified
(`integrity.classify`): "unavailable" (an I/O error, a timeout) is retried after
`RETRY_DELAYS_S`, then raised as `CheckpointUnavailableError` without trying anything older: a
run that fell back past a newer checkpoint it could not read would overwrite its place in the
run (and, by `keep`, delete it). "corrupt" (a checksum mismatch, bytes that do not decode, a
missing part) is reported and the previous checkpoint is tried. Anything else ("error": a
target that does not fit the checkpoint) is a `CheckpointError` at once.

With `collective=True` (every process of a multi-process run calls it together) process 0's list
of checkpoints is the one tried, and each attempt's outcome is agreed on: every process
restores the same step or all fail the same way.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vmoe_train.checkpoints.integrity import Failure, attempt
from vmoe_train.checkpoints.layout import scan

# Seconds to wait before each retry of a checkpoint that cannot be read now (len + 1 tries).
RETRY_DELAYS_S: Sequence[float] = (2.0, 8.0, 30.0)

__all__ = [
    "CheckpointError",
    "CheckpointUnavailableError",
    "CheckpointWarning",
    "restore_latest",
]


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (incomplete or corrupt) or moved aside; one line: path, reason."""


class CheckpointError(RuntimeError):
    """No checkpoint could be restored; the message lists each path tried and why it failed."""


class CheckpointUnavailableError(CheckpointError):
    """The checkpoint to restore cannot be read now (I/O error, timeout, ...), after retries.

    Nothing older was restored and nothing was moved or deleted: run again when storage is
    back. (If the checkpoint is in fact corrupt, move its directory away and run again.)"""


def restore_latest(
    directory: Any,
    step: int | None,
    read: Callable[[Any], Any],
    *,
    collective: bool = False,
    retry_delays: Sequence[float] | None = None,
) -> tuple[Any, int, dict[int, str]]:
    """(read(directory/step), step, {corrupt newer step: reason}) for `step`, or for the newest
    complete step that reads (warning about each one skipped).

    Raises:
      FileNotFoundError: `directory` holds no checkpoint at all.
      CheckpointUnavailableError: the step to restore cannot be read now (after retries).
      CheckpointError: `step` is not a complete checkpoint or is corrupt; or (step None) no
        checkpoint restores (every path and reason listed).
    """
    delays = RETRY_DELAYS_S if retry_delays is None else retry_delays
    found = scan(directory)
    complete = _from_process_0(found.complete) if collective else found.complete
    if step is not None:
        path = directory / str(int(step))
        if int(step) not in complete:
            why = found.incomplete.get(path, "no such checkpoint")
            raise CheckpointError(f"cannot restore {path}: {why} (complete: {complete})")
        ok, result = _read_agreed(read, path, collective, delays)
        if ok:
            return result, int(step), {}
        if result.verdict == "unavailable":
            raise _unavailable(path, result, delays, directory)
        raise CheckpointError(f"cannot restore {path}: {result.reason}")
    if not complete and not found.incomplete:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    tried: list[str] = []
    newest = complete[-1] if complete else -1
    for path, why in sorted(found.incomplete.items(), key=lambda kv: kv[0].name):
        tried.append(f"{path}: {why}")
        if int(path.name.split(".", 1)[0]) > newest:
            warnings.warn(f"{path}: skipped, {why}", CheckpointWarning, stacklevel=3)
    corrupt: dict[int, str] = {}
    for s in reversed(complete):
        path = directory / str(s)
        ok, result = _read_agreed(read, path, collective, delays)
        if ok:
            return result, s, corrupt
        if result.verdict == "unavailable":
            raise _unavailable(path, result, delays, directory)
        if result.verdict == "error":
            raise CheckpointError(f"cannot restore {path}: {result.reason}")
        corrupt[s] = result.reason
        tried.append(f"{path}: {result.reason}")
        warnings.warn(
            f"{path}: cannot be restored, it is corrupt ({result.reason}); trying the previous "
            "checkpoint",
            CheckpointWarning,
            stacklevel=3,
        )
    raise CheckpointError(f"no checkpoint in {directory} can be restored:\n  " + "\n  ".join(tried))


def _unavailable(
    path: Any, failure: Failure, delays: Sequence[float], directory: Any
) -> CheckpointUnavailableError:
    return CheckpointUnavailableError(
        f"{path} cannot be read now ({failure.reason}; {len(delays) + 1} tries over "
        f"{sum(delays):g}s). Nothing older was restored, so that no newer step is lost: run "
        f"again when storage is back. If this checkpoint is corrupt, move it out of {directory} "
        "and run again."
    )


_VERDICTS = ("ok", "corrupt", "error", "unavailable")  # agreed on: the worst over processes


def _read_agreed(
    read: Callable[[Any], Any], path: Any, collective: bool, delays: Sequence[float]
) -> tuple[bool, Any]:
    """`attempt(read, path)`, retried while it cannot be read now; with `collective`, every
    process gets the same verdict (the worst any process had)."""
    for retry in range(len(delays) + 1):
        ok, result = attempt(read, path)
        verdict = "ok" if ok else result.verdict
        if collective:
            agreed = _worst_over_processes(verdict)
            if agreed != verdict:  # another process failed
                ok, result = False, Failure(agreed, f"{agreed} in another process")
                verdict = agreed
        if verdict != "unavailable" or retry == len(delays):
            return ok, result
        warnings.warn(
            f"{path}: cannot be read now ({result.reason}); retrying in {delays[retry]:g}s",
            CheckpointWarning,
            stacklevel=4,
        )
        time.sleep(delays[retry])
    raise AssertionError("unreachable")


def _worst_over_processes(verdict: str) -> str:
    from jax.experimental import multihost_utils

    codes = multihost_utils.process_allgather(np.int32(_VERDICTS.index(verdict)))
    return _VERDICTS[int(np.max(codes))]


def _from_process_0(steps: list[int]) -> list[int]:
    """Process 0's `steps` in every process (one decision, even if listings differ)."""
    from jax.experimental import multihost_utils

    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    if count == 0:
        return []
    local = np.zeros(count, np.int32)
    local[: min(count, len(steps))] = steps[:count]
    return [int(s) for s in multihost_utils.broadcast_one_to_all(local)]
