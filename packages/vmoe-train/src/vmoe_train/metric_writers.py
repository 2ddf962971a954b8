"""Metric writers: JSON lines and TensorBoard event files, without TensorFlow.

Both take `write_scalars(step, {name: value})` with "/"-separated names ("train/loss",
"validation/accuracy"; TensorBoard groups a chart section by the first part), and have
`flush()` and `close()` (and work as context managers). Values are written as they are:
a NaN or infinite loss is information, not something to drop.

    with JsonlWriter(workdir / "metrics.jsonl") as jsonl:
        jsonl.write_scalars(100, {"train/loss": 0.42})  # {"step":100,"time":...,"train/loss":0.42}
    with TensorBoardWriter(workdir / "tensorboard") as tb:
        tb.write_scalars(100, {"train/loss": 0.42})  # tensorboard --logdir workdir/tensorboard
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any, TextIO

_RESERVED = ("step", "time")


def _to_json(value: Any) -> Any:
    # json.dumps' fallback for what it does not know: numpy / jax scalars and arrays, paths, ...
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    tolist = getattr(value, "tolist", None)  # numpy and jax scalars and arrays
    if callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)


class JsonlWriter:
    """Appends one JSON object per line to `path` and flushes every line.

    `write_scalars(step, metrics)` writes `{"step": step, "time": <unix seconds>, **metrics}`;
    `write(record)` writes any JSON-able mapping (e.g. a final `{"summary": ...}`). Every line is
    flushed to the operating system as it is written, so a killed run keeps what it logged. The
    file is opened for appending: a resumed run continues it (a reader that wants one record per
    step keeps the last one). Non-finite floats are written as Python's `json` does (`NaN`,
    `Infinity`), which `json.loads` reads back.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = self.path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends `record` as one JSON line and flushes it."""
        if self._file is None:
            raise ValueError(f"JsonlWriter({str(self.path)!r}) is closed")
        line = json.dumps(dict(record), default=_to_json, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()

    def write_scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends `{"step": step, "time": time.time(), **metrics}`."""
        clash = [k for k in _RESERVED if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved by JsonlWriter (step, time)")
        self.write({"step": int(step), "time": time.time(), **metrics})

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TensorBoardWriter:
    """Writes scalar summaries to a TensorBoard event file in `logdir`, without TensorFlow.

    Uses TensorBoard's own event-file writer (`tensorboard.summary.writer.event_file_writer`),
    which writes from a background thread and flushes at least every `flush_secs`; `flush()`
    blocks until everything written so far is on disk. Each scalar is one `Summary.Value` with
    `simple_value` (float32; TensorBoard shows it under the scalars dashboard, and
    `EventAccumulator.Scalars(tag)` reads it back). Each writer starts a new event file in
    `logdir`; TensorBoard merges the files of one directory (a resumed run continues its charts).
    """

    def __init__(self, logdir: str | os.PathLike[str], *, flush_secs: float = 10.0) -> None:
        # Imported here: the package imports quickly, and only runs that log pay for protobuf.
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer: Any = EventFileWriter(str(self.logdir), flush_secs=flush_secs)

    def write_scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes every `name: value` of `metrics` as a scalar at `step` (one event)."""
        if self._writer is None:
            raise ValueError(f"TensorBoardWriter({str(self.logdir)!r}) is closed")
        values = []
        for name, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"scalar {name!r} is not a number: {value!r}") from None
            values.append(self._summary_pb2.Summary.Value(tag=str(name), simple_value=number))
        if not values:
            return
        event = self._event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=self._summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)

    def flush(self) -> None:
        """Blocks until every scalar written so far is in the event file."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes, stops the writer thread and closes the file (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
