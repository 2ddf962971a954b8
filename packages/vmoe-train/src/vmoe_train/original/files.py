"""Read and write checkpoints in the original V-MoE release's layout: an index plus data shards.

    arrays = read_checkpoint("/ckpts/vmoe_s32_last2_ilsvrc2012")   # {"Encoder/...": array}
    write_checkpoint("/tmp/mine", arrays, num_shards=2)

A checkpoint `PREFIX` is the files (see `vmoe_train.original.wire` for their encoding):

  PREFIX.index                      {"shard_count": n, "version": "20220622", "index": tree}
  PREFIX.data-00000-of-0000n, ...   {"__msgpack_array_chunk_a87ca2__": True, "<i>": chunks}

`tree` is the checkpoint's tree of parameters (nested maps, names as in the original model) with
an index entry at every leaf: the array's shape, dtype, the n-d slices it was cut into and the
shard holding each (or nil where the saved tree held None: not an array, not numbered, as jax
flattens it). Arrays are numbered depth-first with the keys of every map sorted; a shard
maps such a number `i` to the chunks it holds: [[pieces, n-d slice], ...], where the pieces
are 1-d arrays whose concatenation is the chunk, flattened. Arrays split over devices (the
experts) are cut into several slices, usually in different shards; replicated arrays are one
slice. A checkpoint without "version" (written before 2022-06-22) numbers its arrays the same
way for trees of plain maps, which parameter trees (the release's checkpoints) are; such a
checkpoint of a whole training state was numbered in its pytree order, which the file does not
record; reading it assumes the sorted order, and only slices or sizes that then disagree show
that it was another.

Reading checks everything it can and reports every problem of a file at once (`FormatError`):
missing shards, slices out of bounds, chunks of the wrong shape or dtype, parts of an array that
no chunk covers, or that two chunks cover.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from vmoe_train.original.wire import BoxValue, FormatError, IndexEntry, dumps, loads

INDEX_SUFFIX = ".index"
VERSION = "20220622"
KNOWN_VERSIONS = (None, VERSION)
CHUNKS_KEY = "__msgpack_array_chunk_a87ca2__"
PIECE_BYTES = 2**30  # the largest piece of a chunk the release wrote


def shard_path(prefix: str | os.PathLike, shard: int, count: int) -> pathlib.Path:
    """`PREFIX.data-<shard>-of-<count>` (five digits each)."""
    return pathlib.Path(f"{os.fspath(prefix)}.data-{shard:05d}-of-{count:05d}")


def checkpoint_prefix(path: str | os.PathLike) -> pathlib.Path:
    """The prefix of a checkpoint given as its prefix or as its `.index` file."""
    text = os.fspath(path)
    return pathlib.Path(text[: -len(INDEX_SUFFIX)] if text.endswith(INDEX_SUFFIX) else text)


def _walk(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """("a/b/c", leaf) depth-first, map keys sorted: the order arrays are numbered in."""
    if isinstance(tree, Mapping):
        for key in sorted(tree):
            if not isinstance(key, str) or not key or "/" in key:
                raise FormatError(
                    f"key {key!r} under {'/'.join(path) or 'the root'!r} is not a name"
                )
            yield from _walk(tree[key], (*path, key))
    else:
        yield "/".join(path), tree


# ---------------------------------------------------------------------------------------------
# Reading


def read_index(prefix: str | os.PathLike) -> tuple[dict[str, IndexEntry], int]:
    """({path: index entry} in array-number order, shard count) of the checkpoint `prefix`."""
    prefix = checkpoint_prefix(prefix)
    index_file = pathlib.Path(f"{prefix}{INDEX_SUFFIX}")
    if not index_file.is_file():
        # A directory given for the prefix: the checkpoints are probably inside it.
        folder = prefix if prefix.is_dir() else index_file.parent
        near = sorted(str(p) for p in folder.glob(f"*{INDEX_SUFFIX}"))[:5]
        hint = f"; index files there: {near}" if near else ""
        raise FileNotFoundError(
            f"no checkpoint at prefix {str(prefix)!r}: {str(index_file)!r} does not exist{hint}"
        )
    content = _load(index_file)
    if not isinstance(content, Mapping) or not {"shard_count", "index"} <= set(content):
        keys = sorted(content) if isinstance(content, Mapping) else type(content).__name__
        raise FormatError(
            f"{index_file}: an index holds 'shard_count' and 'index' (and 'version'); found {keys}"
        )
    version = content.get("version")
    if version not in KNOWN_VERSIONS:
        raise FormatError(
            f"{index_file}: version={version!r} is not known; allowed: {list(KNOWN_VERSIONS)}"
        )
    count = content["shard_count"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise FormatError(f"{index_file}: shard_count={count!r} must be an integer >= 1")
    entries: dict[str, IndexEntry] = {}
    problems = []
    for path, leaf in _walk(content["index"]):
        if leaf is None:
            continue  # a None of the saved tree (e.g. an optimizer's): no array, no number
        if not isinstance(leaf, IndexEntry):
            problems.append(f"{path}: a leaf of the index must be an index entry, not {leaf!r}")
            continue
        problems += [f"{path}: {p}" for p in _entry_problems(leaf, count)]
        entries[path] = leaf
    if problems:
        raise FormatError(_problems(index_file, problems))
    return entries, count


def _entry_problems(entry: IndexEntry, count: int) -> list[str]:
    problems = []
    for box, shard in zip(entry.boxes, entry.shards, strict=True):
        if not 0 <= shard < count:
            problems.append(f"slice {_show(box)} is in shard {shard}; shards are 0..{count - 1}")
        if len(box) != len(entry.shape) or any(
            not 0 <= start <= stop <= size
            for (start, stop), size in zip(box, entry.shape, strict=False)
        ):
            problems.append(f"slice {_show(box)} is out of bounds of shape {entry.shape}")
    return problems


def read_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of the checkpoint `prefix`, by path ("Encoder/encoderblock_0/..."), in the
    index's order. Each shard is read once; every problem of a file is reported at once."""
    prefix = checkpoint_prefix(prefix)
    entries, count = read_index(prefix)
    paths = list(entries)
    arrays = {path: np.zeros(e.shape, e.dtype) for path, e in entries.items()}
    covered = {path: np.zeros(e.shape, np.uint8) for path, e in entries.items()}
    wanted_shards = sorted({s for e in entries.values() for s in e.shards})
    missing = [shard_path(prefix, s, count) for s in wanted_shards]
    missing = [str(p) for p in missing if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {str(prefix)!r}: its index names {len(missing)} data shard(s) that do "
            f"not exist: {missing}"
        )
    for shard in wanted_shards:
        file = shard_path(prefix, shard, count)
        problems = _fill_from_shard(file, shard, entries, paths, arrays, covered)
        if problems:
            raise FormatError(_problems(file, problems))
    problems = []
    for path, mask in covered.items():
        if mask.size and mask.min() == 0:
            problems.append(
                f"{path}: {int((mask == 0).sum())} of {mask.size} elements are in no chunk"
            )
        if mask.size and mask.max() > 1:
            problems.append(f"{path}: {int((mask > 1).sum())} elements are in two or more chunks")
    if problems:
        raise FormatError(_problems(pathlib.Path(f"{prefix}*"), problems))
    return arrays


def _fill_from_shard(file, shard, entries, paths, arrays, covered) -> list[str]:
    content = _load(file)
    if not isinstance(content, Mapping) or content.get(CHUNKS_KEY) is not True:
        return [f"a data shard is a map with {CHUNKS_KEY!r}: true; this one is not"]
    problems = []
    for key, chunks in content.items():
        if key == CHUNKS_KEY:
            continue
        if not (isinstance(key, str) and key.isdigit() and int(key) < len(paths)):
            problems.append(f"array number {key!r} is not in the index ({len(paths)} arrays)")
            continue
        path = paths[int(key)]
        entry = entries[path]
        expected = {box for box, s in zip(entry.boxes, entry.shards, strict=True) if s == shard}
        for chunk in chunks if isinstance(chunks, list) else [chunks]:
            problem = _place(chunk, entry, expected, arrays[path], covered[path])
            if problem:
                problems.append(f"{path}: {problem}")
    return problems


def _place(chunk, entry: IndexEntry, expected, array, covered) -> str | None:
    """Copies one [pieces, n-d slice] chunk into `array`; a problem, or None."""
    if not (isinstance(chunk, list) and len(chunk) == 2 and isinstance(chunk[0], list)):
        return "a chunk must be [pieces, n-d slice]"
    pieces, slices = chunk
    try:
        box = slices.box(entry.shape)
    except (AttributeError, FormatError) as error:
        return f"a chunk's slice is not an n-d slice of shape {entry.shape} ({error})"
    if box not in expected:
        return f"this shard holds slice {_show(box)}, which the index does not put here"
    if not all(isinstance(p, np.ndarray) for p in pieces):
        return f"slice {_show(box)}: the pieces of a chunk must be arrays"
    dtypes = {p.dtype for p in pieces}
    if dtypes - {entry.dtype}:
        names = sorted(d.name for d in dtypes)
        return f"slice {_show(box)}: chunk dtype {names} but the index says {entry.dtype.name}"
    extent = tuple(stop - start for start, stop in box)
    flat = np.concatenate([p.reshape(-1) for p in pieces]) if pieces else np.zeros(0, entry.dtype)
    if flat.size != int(np.prod(extent, dtype=np.int64)):
        return (
            f"slice {_show(box)} needs {int(np.prod(extent))} elements; the chunk has {flat.size}"
        )
    region = tuple(slice(start, stop) for start, stop in box)
    array[region] = flat.reshape(extent)
    covered[region] += 1
    return None


def _load(file: pathlib.Path) -> Any:
    try:
        return loads(file.read_bytes())
    except FormatError as error:
        raise FormatError(f"{file}: {error}") from None


def _show(box) -> str:
    return "[" + ", ".join(f"{start}:{stop}" for start, stop in box) + "]"


def _problems(where: pathlib.Path, problems: list[str]) -> str:
    return f"{where}: {len(problems)} problem(s): " + "; ".join(problems)


# ---------------------------------------------------------------------------------------------
# Writing


def _nest(arrays: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b": x} -> {"a": {"b": x}}; nested maps are taken as they are."""
    tree: dict[str, Any] = {}
    for path, value in arrays.items():
        if isinstance(value, Mapping):
            value = _nest(value)
        node = tree
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{path!r}: {part!r} is both an array and a group")
        if parts[-1] in node:
            raise ValueError(f"{path!r} is given twice")
        node[parts[-1]] = value
    return tree


def _split_boxes(shape: tuple[int, ...], parts: int) -> list[tuple[tuple[int, int], ...]]:
    whole = tuple((0, n) for n in shape)
    if parts <= 1 or not shape or shape[0] % parts:
        return [whole]
    step = shape[0] // parts
    return [((i * step, (i + 1) * step), *whole[1:]) for i in range(parts)]


def write_checkpoint(
    prefix: str | os.PathLike,
    arrays: Mapping[str, Any],
    *,
    num_shards: int = 1,
    split: Callable[[str], bool] | None = None,
    piece_bytes: int = PIECE_BYTES,
) -> list[pathlib.Path]:
    """Writes `arrays` ({"a/b": array} or nested maps) as the checkpoint `prefix`.

    Args:
      num_shards: data shards to write. Arrays for which `split(path)` is true (default: none)
        are cut along their first axis into `num_shards` slices (when it divides), slice i in
        shard i, as the release stored experts split over devices; other arrays are one slice,
        each in the shard holding the fewest slices so far. Shards left empty are not written.
      piece_bytes: the largest piece a chunk is cut into (the release: 2**30).

    Returns:
      The files written (index first). Each is written to a temporary name and renamed.
    """
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards={num_shards!r} must be an integer >= 1")
    if not isinstance(piece_bytes, int) or piece_bytes < 1:
        raise ValueError(f"piece_bytes={piece_bytes!r} must be an integer >= 1")
    prefix = checkpoint_prefix(prefix)
    leaves = list(_walk(_nest(arrays)))
    load = [0] * num_shards
    placed = []  # (path, array, [(box, shard)])
    for path, value in leaves:
        array = np.asarray(value)
        boxes = _split_boxes(array.shape, num_shards if split and split(path) else 1)
        if len(boxes) > 1:
            shards = list(range(len(boxes)))
        else:
            shards = [min(range(num_shards), key=lambda s: (load[s], s))]
        for s in shards:
            load[s] += 1
        placed.append((path, array, list(zip(boxes, shards, strict=True))))
    used = sorted({s for *_, pairs in placed for _, s in pairs})
    renumber = {old: new for new, old in enumerate(used)}
    count = len(used) or 1
    index: dict[str, Any] = {}
    shards: dict[int, dict[str, Any]] = {s: {CHUNKS_KEY: True} for s in range(count)}
    for number, (path, array, pairs) in enumerate(placed):
        entry = IndexEntry(
            shape=array.shape,
            dtype=array.dtype,
            boxes=tuple(box for box, _ in pairs),
            shards=tuple(renumber[s] for _, s in pairs),
        )
        index[path] = entry
        for box, s in pairs:
            chunk = array[tuple(slice(start, stop) for start, stop in box)].reshape(-1)
            step = max(1, piece_bytes // max(array.dtype.itemsize, 1))
            pieces = [chunk[i : i + step] for i in range(0, chunk.size, step)] or [chunk]
            shards[renumber[s]].setdefault(str(number), []).append([pieces, BoxValue(box)])
    content = {"shard_count": count, "index": _nest(index), "version": VERSION}
    written = [_write(pathlib.Path(f"{prefix}{INDEX_SUFFIX}"), content)]
    for s, data in shards.items():
        written.append(_write(shard_path(prefix, s, count), data))
    return written


def _write(file: pathlib.Path, content: Any) -> pathlib.Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.with_name(f".tmp.{file.name}")
    temporary.write_bytes(dumps(content))
    os.replace(temporary, file)
    return file
