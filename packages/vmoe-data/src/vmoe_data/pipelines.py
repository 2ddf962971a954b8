"""grain input pipelines: train (shuffled, repeated, sharded), eval (ordered, padded, masked),
few-shot (n examples per class, then eval-style batches).

Every pipeline is built from `grain.MapDataset` transformations over a random-access source, so
an element is a pure function of (seed, its index): the same seed gives the same batches, the
iterator state is just a position (`it.get_state()` / `it.set_state(state)`, a small
JSON-serialisable dict), and worker processes (`num_workers`) do not change what comes out.

Two ways to make a batch, with the same contract (which examples, in which order, on which
process; masks and padding; resuming):
- per example (any split, any ops): read, preprocess and stack L examples one by one, each
  with its own `np.random.Generator`;
- vectorised, when the split is held in memory (`cache`, see `vmoe_data.cache`) and every op
  of the pp spec has a vectorised form: gather L examples from the arrays and run each op once
  on the whole batch, random draws from `vmoe_data.Draws`. Tens of times less Python per
  example; random ops draw other numbers than per example (same distributions), and the
  shuffle is a per-epoch permutation by numpy instead of grain's index shuffle.

Shapes: B global batch size, P processes, L = B / P local batch size (what each process gets).
Batches are dicts of numpy arrays with leading axis L, e.g. `{"image": [L, H, W, C], ...}`;
eval and few-shot batches also hold `"mask"`: bool [L], False on padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grain
import numpy as np

from vmoe_data._iterator import ResumableDataset
from vmoe_data.cache import in_memory
from vmoe_data.dataset import Dataset, IndexedSource, Source
from vmoe_data.few_shot import few_shot_indices
from vmoe_data.preprocess import PPSpec, Preprocess, preprocess
from vmoe_data.registry import DEFAULT_DATASET, get_dataset
from vmoe_plugins import check_bool, check_int


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
    cache: bool | None = None,
) -> grain.IterDataset:
    """Training batches of L = batch_size / P examples for this process.

    The examples of an epoch are shuffled with `seed` (a new order each epoch, the same on every
    process), and process p takes elements p, p + P, p + 2P, ... of that global stream: over one
    epoch the processes together see every example exactly once. Global batch b is stream
    elements b*B .. b*B + B - 1, so every process gets the same number of batches, all of L
    examples.

    Args:
      dataset: a `Dataset` or a registered name (default: the embedded digits).
      batch_size: the global batch size B; must be divisible by the process count P.
      split: the split to read, e.g. "train" or "train[:90%]".
      pp: the preprocessing spec (see `vmoe_data.preprocess`); batch ops run after batching.
      seed: seeds the shuffle and every random op; an int in [0, 2**32).
      num_epochs: epochs to read; None repeats forever.
      shuffle: False keeps the split's order (then only the random ops use the seed).
      drop_remainder: with num_epochs set, True drops the stream's last T mod B examples (T =
        num_epochs * N; an error if T < B); False pads the last global batch to B with copies
        of the last example and adds `batch["mask"]` (bool [L], False on padding) to every
        batch, as eval does.
      num_workers: worker processes that preprocess batches (0: threads in this process).
        They are spawned: a script must guard its entry point with
        `if __name__ == "__main__":`.
      num_threads: threads reading and preprocessing, one batch each (default: 0, batches
        made in the calling thread, on the vectorised path; else min(8, CPUs available /
        max(1, num_workers))).
      process_index, process_count: this process's place among P; default
        `jax.process_index()`, `jax.process_count()`.
      cache: hold the split in memory: None (default) when it takes at most
        `vmoe_data.cache.AUTO_CACHE_BYTES` and its examples stack, True whatever its size,
        False never. In memory, batches are made by the vectorised ops where the spec allows.

    Returns:
      A `grain.IterDataset`; `iter(...)` gives an iterator whose `get_state()` is
      `{"batches": k}` and whose `set_state(state)` resumes at batch k, whatever `num_workers`.
    """
    seed = check_int("seed", seed, 0, 2**32 - 1)
    if num_epochs is not None:
        num_epochs = check_int("num_epochs", num_epochs, 1)
    shuffle = check_bool("shuffle", shuffle)
    drop_remainder = check_bool("drop_remainder", drop_remainder)
    index, count = resolve_processes(process_index, process_count)
    local_batch = local_batch_size(batch_size, count)
    pp = preprocess(pp)
    source = _resolve(dataset).source(split)
    _check_example(source, pp)
    size = len(source)
    total = None if num_epochs is None else num_epochs * size  # examples in the stream
    if total is not None and drop_remainder:
        total = total // batch_size * batch_size
        if not total:
            raise ValueError(
                f"split {split!r} has {size} examples x num_epochs={num_epochs}, fewer "
                f"than batch_size={batch_size}: drop_remainder=True leaves no batch; use a "
                "smaller batch_size, more epochs or drop_remainder=False"
            )
    memory = in_memory(source, cache)
    if memory is not None and pp.vectorizable:
        num_threads = _VECTORIZED_THREADS if num_threads is None else num_threads
        ds = grain.MapDataset.source(
            _StackedBatches(
                memory.arrays,
                pp,
                key=_seed(seed, _EXAMPLE),
                positions=_train_positions(batch_size, index, count),
                total=total,
                masked=not drop_remainder,
                order=_EpochOrder(size, _seed(seed, _SHUFFLE) if shuffle else None),
            )
        )
    else:
        ds = grain.MapDataset.source(memory or source)
        if shuffle:
            ds = ds.shuffle(seed=_seed(seed, _SHUFFLE))
        ds = ds.repeat(num_epochs)
        ds = ds.random_map(pp, seed=_seed(seed, _EXAMPLE))  # seeded by the global index: any P
        if total is not None and drop_remainder:
            ds = ds[:total]
        elif not drop_remainder:
            padded = len(ds) if total is None else math.ceil(total / batch_size) * batch_size
            ds = grain.MapDataset.source(_MaskedPadding(ds, padded))
        ds = ds[index::count].batch(local_batch, batch_fn=_stack_examples)
    if pp.batch_ops:
        ds = ds.random_map(pp.apply_batch, seed=_seed(seed, _BATCH, index))
    return ResumableDataset(ds, num_workers, num_threads)


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
    cache: bool | None = None,
) -> grain.IterDataset:
    """Every example of `split` once, in order, in ceil(N / B) batches on every process.

    Global batch b holds examples b*B .. b*B + B - 1, process p the L of them starting at
    b*B + p*L. The last batch is padded (with copies of the last example) to full size;
    `batch["mask"]` (bool [L]) is False on padding, so masked sums count every example once.

    Args: as `train_pipeline`; `seed` only seeds random ops, if the spec has any (example i
    gets the same random draws whatever P is). Batch ops (e.g. mixup) are an error: they would
    mix padding into real examples.
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
        cache=cache,
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
    cache: bool | None = None,
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
        cache=cache,
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
    cache: bool | None,
) -> grain.IterDataset:
    seed = check_int("seed", seed, 0, 2**32 - 1)
    index, count = resolve_processes(process_index, process_count)
    local_batch = local_batch_size(batch_size, count)
    pp = preprocess(pp)
    if pp.batch_ops:
        raise ValueError(
            f"pp spec {pp.spec!r} has batch ops {[text for text, _ in pp.batch_ops]}; eval and "
            "few-shot batches are padded, and a batch op would mix padding into real "
            "examples: remove them"
        )
    _check_example(source, pp)
    memory = in_memory(source, cache)
    if memory is not None and pp.vectorizable:
        num_threads = _VECTORIZED_THREADS if num_threads is None else num_threads
        ds = grain.MapDataset.source(
            _StackedBatches(
                memory.arrays,
                pp,
                key=_seed(seed, _EVAL),
                positions=_eval_positions(batch_size, index, count),
                total=len(source),
                masked=True,
                order=_EpochOrder(len(source), None),
            )
        )
        return ResumableDataset(ds, num_workers, num_threads)
    ds = grain.MapDataset.source(memory or source).random_map(pp, seed=_seed(seed, _EVAL))
    padded = max(1, math.ceil(len(source) / batch_size)) * batch_size
    ds = grain.MapDataset.source(_MaskedPadding(ds, padded))
    ds = ds.batch(local_batch, batch_fn=_stack_examples)[index::count]  # b*P + p: rows b*B + p*L
    return ResumableDataset(ds, num_workers, num_threads)


_ENDLESS = 2**62  # batches of a pipeline that repeats forever
# A vectorised batch takes well under a millisecond to make: reading threads would cost more
# (handing batches between threads, taking the GIL from the training loop) than they overlap.
_VECTORIZED_THREADS = 0


class _StackedBatches:
    """The batches of a pipeline over an in-memory split, made by the vectorised ops.

    Batch k of this process holds the stream positions `positions(k)` (int64 [L]); position i
    is example `order(i)` of the split, preprocessed with draws keyed by i. With `total`
    (stream length) set, positions past it are padding: copies of position total - 1, and
    `"mask"` is False there. `masked` adds `"mask"` to every batch.
    """

    def __init__(self, arrays, pp, *, key, positions, total, masked, order) -> None:
        self.arrays = arrays
        self.pp = pp
        self.key = key
        self.positions = positions
        self.total = total
        self.masked = masked
        self.order = order
        self.batch_size = positions.batch_size
        self.length = _ENDLESS if total is None else math.ceil(total / self.batch_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict:
        positions = self.positions(int(k))
        ids = positions if self.total is None else np.minimum(positions, self.total - 1)
        rows = self.order(ids)
        batch = {name: values[rows] for name, values in self.arrays.items()}
        batch = self.pp.apply_vectorized(batch, self.key, ids)
        if self.masked:
            batch["mask"] = positions < (self.total if self.total is not None else _ENDLESS)
        return batch


class _Positions:
    """positions(k): the stream positions of batch k's rows on this process (int64 [L])."""

    def __init__(self, batch_size: int, offsets: np.ndarray) -> None:
        self.batch_size = batch_size  # B: positions k*B .. k*B + B - 1 form global batch k
        self.offsets = offsets

    def __call__(self, k: int) -> np.ndarray:
        return k * self.batch_size + self.offsets


def _train_positions(batch_size: int, index: int, count: int) -> _Positions:
    """Process p takes rows p, p + P, ... of each global batch (as `ds[p::P].batch(L)`)."""
    return _Positions(batch_size, np.arange(index, batch_size, count, dtype=np.int64))


def _eval_positions(batch_size: int, index: int, count: int) -> _Positions:
    """Process p takes rows p*L .. p*L + L - 1 of each global batch (as `batch(L)[p::P]`)."""
    local = batch_size // count
    return _Positions(batch_size, np.arange(index * local, (index + 1) * local, dtype=np.int64))


class _EpochOrder:
    """order(positions): the example at each stream position; epoch e = position // N is a
    permutation of the split drawn from (seed, e), or the split's order with seed None."""

    def __init__(self, size: int, seed: int | None) -> None:
        self.size = size
        self.seed = seed
        self._recent: dict[int, np.ndarray] = {}  # epoch -> permutation (a batch spans <= 2)

    def _permutation(self, epoch: int) -> np.ndarray:
        permutation = self._recent.get(epoch)
        if permutation is None:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            if len(self._recent) >= 4:
                self._recent.clear()
            self._recent[epoch] = permutation
        return permutation

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        epochs, rows = np.divmod(positions, self.size)
        if self.seed is None:
            return rows
        for epoch in np.unique(epochs):
            here = epochs == epoch
            rows[here] = self._permutation(int(epoch))[rows[here]]
        return rows


class _MaskedPadding:
    """`ds` padded to `length` with copies of its last element; `"mask"` is False on those."""

    def __init__(self, ds: grain.MapDataset, length: int) -> None:
        self.ds = ds
        self.size = len(ds)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        example = self.ds[min(index, self.size - 1)]
        return {**example, "mask": np.bool_(index < self.size)}


def _stack_examples(examples: Sequence[dict]) -> dict:
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
            batch[key] = _stack_examples(values)
            continue
        values = [np.asarray(value) for value in values]
        shapes = sorted({value.shape for value in values})
        if len(shapes) > 1:
            only_channels = len({s[:-1] for s in shapes}) == 1 and min(map(len, shapes)) == 3
            fix = (
                "make the channels agree with decode(channels=1) or decode(channels=3)"
                if only_channels
                else "add a resize or crop op to the pp spec"
            )
            raise ValueError(
                f"examples in a batch differ in the shape of {key!r}: {shapes[:4]}; {fix}"
            )
        batch[key] = np.stack(values)
    return batch


def resolve_processes(index: int | None, count: int | None) -> tuple[int, int]:
    """(process index, process count): the given ones, else jax's."""
    if index is None or count is None:
        import jax  # only when the caller leaves it to jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    count = check_int("process_count", count, 1)
    index = check_int("process_index", index, 0, count - 1, where=f"process_count={count}: ")
    return index, count


def local_batch_size(batch_size: int, process_count: int) -> int:
    """B / P, checking that P divides B."""
    batch_size = check_int("batch_size", batch_size, 1)
    process_count = check_int("process_count", process_count, 1)
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


IMAGE_DTYPES = ("uint8", "float16", "bfloat16", "float32")


def _check_example(source: Source, pp: Preprocess) -> None:
    """Runs the per-example ops on the first example now, so bad specs/images fail here, and
    checks that its `"image"`, if it keeps one, is an [H, W, C] array of an image dtype."""
    if len(source) == 0:
        raise ValueError("the source has no examples")
    example = pp(source[0], np.random.default_rng(0))
    if isinstance(example, dict) and "image" in example:
        image = example["image"]
        if not (
            isinstance(image, np.ndarray) and image.ndim == 3 and image.dtype.name in IMAGE_DTYPES
        ):
            shown = (
                f"dtype {image.dtype} shape {image.shape}"
                if isinstance(image, np.ndarray)
                else f"a {type(image).__name__}"
            )
            raise ValueError(
                f"pp spec {pp.spec!r} leaves 'image' as {shown}; batches need an [H, W, C] "
                f"array of {list(IMAGE_DTYPES)}: start the spec with decode, or drop the image "
                "with keep(...)"
            )


# Seed streams: every random stream of a pipeline is SeedSequence([seed, stream, process]).
_SHUFFLE, _EXAMPLE, _BATCH, _EVAL = range(4)


def _seed(seed: int, stream: int, process: int = 0) -> int:
    """The seed of one random stream; distinct (seed, stream, process) give distinct seeds.

    Every key has the same length (SeedSequence treats [a, b] and [a, b, 0] alike).
    """
    return int(np.random.SeedSequence([seed, stream, process]).generate_state(1)[0])
