"""Iteration over a pipeline's `grain.MapDataset` of batches, with a resumable position.

Every pipeline ends in a `MapDataset` whose element k is batch k, a pure function of (seed, k).
So the iterator state is just `{"batches": k}` (batches read so far), the same whatever
`num_workers` is: restoring starts a fresh grain iterator over `batches[k:]`, with this
pipeline's own worker count. A state saved with 0 workers restores with 2, and back.
"""

from __future__ import annotations

import os
from typing import Any

import grain

from vmoe_plugins import check_int

MAX_DEFAULT_THREADS = 8


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ResumableDataset(grain.IterDataset):
    """A `grain.IterDataset` over `batches` whose iterators save `{"batches": k}` states.

    Memory: each reading thread holds the batch it is building, so a process holds about
    `num_threads + 1` batches (the prefetch buffer is `num_threads` batches), in each of
    `max(1, num_workers)` processes.
    """

    def __init__(
        self, batches: grain.MapDataset, num_workers: int = 0, num_threads: int | None = None
    ) -> None:
        super().__init__()
        self._batches = batches
        self.num_workers = check_int("num_workers", num_workers, 0)
        if num_threads is None:
            share = available_cpus() // max(1, self.num_workers)
            num_threads = max(1, min(MAX_DEFAULT_THREADS, share))
        self.num_threads = check_int("num_threads", num_threads, 0)

    def __iter__(self) -> ResumableIterator:
        return ResumableIterator(self)

    def iter_from(self, position: int) -> grain.DatasetIterator:
        """A grain iterator over batches position, position + 1, ..."""
        batches = self._batches[position:] if position else self._batches
        read = grain.ReadOptions(
            num_threads=self.num_threads, prefetch_buffer_size=max(1, self.num_threads)
        )
        it_ds = batches.to_iter_dataset(read)
        if self.num_workers:
            _absl_flags_parsed()
            options = grain.MultiprocessingOptions(num_workers=self.num_workers)
            it_ds = it_ds.mp_prefetch(options)
        return iter(it_ds)

    def __str__(self) -> str:
        return f"ResumableDataset(num_workers={self.num_workers}, num_threads={self.num_threads})"


class ResumableIterator(grain.DatasetIterator):
    """Batches in order; `get_state()` is `{"batches": k}`, `set_state` resumes at batch k."""

    def __init__(self, dataset: ResumableDataset) -> None:
        super().__init__()
        self._dataset = dataset
        self._position = 0
        self._inner: grain.DatasetIterator | None = None  # started on the first next()

    def __next__(self) -> Any:
        if self._inner is None:
            self._inner = self._dataset.iter_from(self._position)
        batch = next(self._inner)
        self._position += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"batches": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"batches"}:
            raise ValueError(
                f"iterator state {state!r} must be a dict {{'batches': k}} from get_state()"
            )
        position = check_int("batches", state["batches"], 0, where="iterator state: ")
        self._close_inner()
        self._position = position

    def close(self) -> None:
        self._close_inner()

    def _close_inner(self) -> None:
        if self._inner is not None and hasattr(self._inner, "close"):
            self._inner.close()
        self._inner = None


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags. Outside `absl.app.run` they are never parsed,
    so mark them parsed (every flag at its default) rather than fail with
    UnparsedFlagAccessError. This touches the process-wide `absl.flags.FLAGS`, and only when
    `num_workers > 0`; flags parsed by the caller are left alone."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
