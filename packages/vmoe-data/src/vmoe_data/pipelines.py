"""grain input pipelines: train (shuffled, repeated, sharded), eval (ordered, padded, masked),
few-shot (n examples per class, then eval-style batches).

Every pipeline is built from `grain.MapDataset` transformations over a random-access source, so
an element is a pure function of (seed, its index): the same seed gives the same batches, the
iterator state is just a position (`it.get_state()` / `it.set_state(state)`, a small
JSON-serialisable dict), and worker processes (`num_workers`) do not change what comes out.

Shapes: B global batch size, P processes, L = B / P local batch size (what each process gets).
Batches are dicts of numpy arrays with leading axis L, e.g. `{"image": [L, H, W, C], ...}`;
eval and few-shot batches also hold `"mask"`: bool [L], False on padding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from vmoe_data.dataset import Dataset, IndexedSource, Source
from vmoe_data.few_shot import few_shot_indices
from vmoe_data.preprocess import PPSpec, Preprocess, preprocess
from vmoe_data.registry import DEFAULT_DATASET, get_dataset


def train_pipeline(
    dataset: Dataset | str = DEFAULT_DATASET,
    *,
    batch_size: int,
    split: str = "train",
    pp: PPSpec = None,
    seed: int = 0,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_workers: int = 0,
    num_threads: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Training batches of L = batch_size / P examples for this process.

    The examples of an epoch are shuffled with `seed` (a new order each epoch, the same on every
    process), and process p takes elements p, p + P, p + 2P, ... of that global stream: over one
    epoch the processes together see every example exactly once.

    Args:
      dataset: a `Dataset` or a registered name (default: the embedded digits).
      batch_size: the global batch size B; must be divisible by the process count P.
      split: the split to read, e.g. "train" or "train[:90%]".
      pp: the preprocessing spec (see `vmoe_data.preprocess`); batch ops run after batching.
      seed: seeds the shuffle and every random op; an int in [0, 2**32).
      num_epochs: epochs to read; None repeats forever.
      shuffle: False keeps the split's order (then only the random ops use the seed).
      drop_remainder: drop a last, partial batch (only reached when num_epochs is set).
      num_workers: worker processes that preprocess batches (0: threads in this process).
      num_threads: threads reading and preprocessing (default: min(16, CPU count)).
      process_index, process_count: this process's place among P; default
        `jax.process_index()`, `jax.process_count()`.

    Returns:
      A `grain.IterDataset`; `iter(...)` gives an iterator with `get_state` / `set_state`.
    """
    _check_int("seed", seed, 0, 2**32 - 1)
    if num_epochs is not None:
        _check_int("num_epochs", num_epochs, 1)
    index, count = resolve_processes(process_index, process_count)
    local_batch = local_batch_size(batch_size, count)
    pp = preprocess(pp)
    source = _resolve(dataset).source(split)
    _check_example(source, pp)
    shuffle_seed, example_seed, batch_seed = _derive_seeds(seed, 3)
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(pp, seed=example_seed)  # seeded by the global index: same on any P
    ds = ds[index::count]
    ds = ds.batch(local_batch, drop_remainder=drop_remainder, batch_fn=stack_examples)
    if pp.batch_ops:
        ds = ds.random_map(pp.apply_batch, seed=int(_derive_seeds(batch_seed + index, 1)[0]))
    return _to_iter(ds, num_workers, num_threads)


def eval_pipeline(
    dataset: Dataset | str = DEFAULT_DATASET,
    *,
    batch_size: int,
    split: str = "test",
    pp: PPSpec = None,
    seed: int = 0,
    num_workers: int = 0,
    num_threads: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Every example of `split` once, in order, in ceil(N / B) batches on every process.

    Global batch b holds examples b*B .. b*B + B - 1, process p the L of them starting at
    b*B + p*L. The last batch is padded (with copies of the last example) to full size;
    `batch["mask"]` (bool [L]) is False on padding, so masked sums count every example once.

    Args: as `train_pipeline`; `seed` only seeds random ops, if the spec has any.
    """
    return _eval_over(
        _resolve(dataset).source(split),
        batch_size=batch_size,
        pp=pp,
        seed=seed,
        num_workers=num_workers,
        num_threads=num_threads,
        process_index=process_index,
        process_count=process_count,
    )


def few_shot_pipeline(
    dataset: Dataset | str = DEFAULT_DATASET,
    *,
    shots: int,
    batch_size: int,
    split: str = "train",
    pp: PPSpec = None,
    seed: int = 0,
    num_workers: int = 0,
    num_threads: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Eval-style batches (ordered, padded, masked) of `shots` examples per class of `split`.

    The examples are `few_shot_indices(labels, shots, seed)`: a seeded draw without
    replacement per class, in source order. The same seed gives the same examples.
    """
    data = _resolve(dataset)
    indices = few_shot_indices(data.labels(split), shots, seed, num_classes=data.num_classes)
    return _eval_over(
        IndexedSource(data.source(split), indices),
        batch_size=batch_size,
        pp=pp,
        seed=seed,
        num_workers=num_workers,
        num_threads=num_threads,
        process_index=process_index,
        process_count=process_count,
    )


def _eval_over(
    source: Source,
    *,
    batch_size: int,
    pp: PPSpec,
    seed: int,
    num_workers: int,
    num_threads: int | None,
    process_index: int | None,
    process_count: int | None,
) -> grain.IterDataset:
    _check_int("seed", seed, 0, 2**32 - 1)
    index, count = resolve_processes(process_index, process_count)
    local_batch = local_batch_size(batch_size, count)
    pp = preprocess(pp)
    _check_example(source, pp)
    padded = _PaddedShard(source, batch_size, local_batch, index)
    ds = grain.MapDataset.source(padded).random_map(_MaskedPP(pp), seed=_derive_seeds(seed, 1)[0])
    ds = ds.batch(local_batch, batch_fn=stack_examples)
    if pp.batch_ops:
        ds = ds.random_map(pp.apply_batch, seed=int(_derive_seeds(seed + 1 + index, 1)[0]))
    return _to_iter(ds, num_workers, num_threads)


class _PaddedShard:
    """This process's rows of the padded global batches: `[j] -> (example, is_real)`."""

    def __init__(self, source: Source, batch_size: int, local_batch: int, index: int) -> None:
        self.source = source
        self.size = len(source)
        self.batch_size = batch_size
        self.local_batch = local_batch
        self.offset = index * local_batch
        self.num_batches = max(1, math.ceil(self.size / batch_size))

    def __len__(self) -> int:
        return self.num_batches * self.local_batch

    def __getitem__(self, j: int) -> tuple[dict, bool]:
        batch, row = divmod(int(j), self.local_batch)
        global_index = batch * self.batch_size + self.offset + row
        real = global_index < self.size
        return self.source[min(global_index, self.size - 1)], real


class _MaskedPP:
    """Preprocesses an (example, is_real) pair and adds `"mask"` after the pp ops."""

    def __init__(self, pp: Preprocess) -> None:
        self.pp = pp

    def __call__(self, item: tuple[dict, bool], rng: np.random.Generator) -> dict:
        example, real = item
        return {**self.pp(example, rng), "mask": np.bool_(real)}


def stack_examples(examples: Sequence[dict]) -> dict:
    """Stacks examples (dicts of arrays, possibly nested) into a batch: leading axis L.

    Examples whose features or shapes differ are an error that names the feature.
    """
    keys = examples[0].keys()
    batch = {}
    for example in examples:
        if example.keys() != keys:
            raise ValueError(
                f"examples in a batch have different features: {sorted(keys)} and {sorted(example)}"
            )
    for key in keys:
        values = [example[key] for example in examples]
        if isinstance(values[0], dict):
            batch[key] = stack_examples(values)
            continue
        values = [np.asarray(value) for value in values]
        shapes = sorted({value.shape for value in values})
        if len(shapes) > 1:
            raise ValueError(
                f"examples in a batch differ in the shape of {key!r}: {shapes[:4]}; add a "
                "resize or crop op to the pp spec"
            )
        batch[key] = np.stack(values)
    return batch


def resolve_processes(index: int | None, count: int | None) -> tuple[int, int]:
    """(process index, process count): the given ones, else jax's."""
    if index is None or count is None:
        import jax  # only when the caller leaves it to jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    _check_int("process_count", count, 1)
    if not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"process_index={index!r} must be an int in [0, process_count={count})")
    return index, count


def local_batch_size(batch_size: int, process_count: int) -> int:
    """B / P, checking that P divides B."""
    _check_int("batch_size", batch_size, 1)
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}; "
            f"use a multiple of {process_count}"
        )
    return batch_size // process_count


def _resolve(dataset: Dataset | str) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    return get_dataset(dataset)


def _check_example(source: Source, pp: Preprocess) -> None:
    """Runs the per-example ops on the first example now, so bad specs/images fail here."""
    if len(source) == 0:
        raise ValueError("the source has no examples")
    pp(source[0], np.random.default_rng(0))


def _derive_seeds(seed: int, n: int) -> list[int]:
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n)]


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be an int")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be {allowed}")


def _to_iter(ds: grain.MapDataset, num_workers: int, num_threads: int | None) -> grain.IterDataset:
    _check_int("num_workers", num_workers, 0)
    threads = min(16, os.cpu_count() or 1) if num_threads is None else num_threads
    _check_int("num_threads", threads, 0)
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, 2 * threads))
    it_ds = ds.to_iter_dataset(read)
    if num_workers:
        _absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside absl.app they are never parsed, so
    mark them parsed (all defaults) rather than fail with UnparsedFlagAccessError."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
