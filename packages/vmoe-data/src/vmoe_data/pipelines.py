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
from collections.abc import Sequence

import grain
import numpy as np

from vmoe_data._iterator import ResumableDataset
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
      num_threads: threads reading and preprocessing, one batch each (default:
        min(8, CPUs available / max(1, num_workers))).
      process_index, process_count: this process's place among P; default
        `jax.process_index()`, `jax.process_count()`.

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
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=_seed(seed, _SHUFFLE))
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(pp, seed=_seed(seed, _EXAMPLE))  # seeded by the global index: same on any P
    if num_epochs is not None and drop_remainder:
        usable = len(ds) // batch_size * batch_size
        if not usable:
            raise ValueError(
                f"split {split!r} has {len(source)} examples x num_epochs={num_epochs}, fewer "
                f"than batch_size={batch_size}: drop_remainder=True leaves no batch; use a "
                "smaller batch_size, more epochs or drop_remainder=False"
            )
        ds = ds[:usable]
    elif not drop_remainder:
        padded = len(ds) if num_epochs is None else math.ceil(len(ds) / batch_size) * batch_size
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
    ds = grain.MapDataset.source(source).random_map(pp, seed=_seed(seed, _EVAL))
    padded = max(1, math.ceil(len(source) / batch_size)) * batch_size
    ds = grain.MapDataset.source(_MaskedPadding(ds, padded))
    ds = ds.batch(local_batch, batch_fn=_stack_examples)[index::count]  # b*P + p: rows b*B + p*L
    return ResumableDataset(ds, num_workers, num_threads)


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
