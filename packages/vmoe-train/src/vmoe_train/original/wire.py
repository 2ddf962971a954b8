"""The msgpack encoding of the original V-MoE release's checkpoint files: values and their types.

Each file of such a checkpoint (the `.index` and every `.data-nnnnn-of-mmmmm` shard) is one
msgpack document. Plain data (maps with string keys, arrays, integers, strings, booleans) is
msgpack's own; other values are msgpack extension types whose payload is a msgpack document:

    code  value              payload
    1     array              [shape, dtype name, the raw bytes in C order]
    3     NumPy scalar       as an array of shape []
    4     shape and dtype    [shape, dtype name, weak_type, {}]
    5     slice              [start, stop, step]
    6     n-d slice          [payload of a code 5 slice, ...] (the payloads, not extension values)
    8     index entry        [payload of code 4, [payload of code 6, ...], [shard, ...]]

Codes 2 (a complex number) and 7 (an array of n-d slices) never occur in parameter checkpoints
and are refused, as is any other code. Nothing here executes code from a file: no pickle.

Shape legend: an n-d slice is one (start, stop) pair per axis of the array it cuts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import msgpack
import numpy as np

ARRAY, NUMPY_SCALAR, SHAPE_DTYPE, SLICE, SLICE_ND, INDEX_ENTRY = 1, 3, 4, 5, 6, 8
CODE_NAMES = {
    1: "array",
    2: "complex number",
    3: "NumPy scalar",
    4: "shape and dtype",
    5: "slice",
    6: "n-d slice",
    7: "array of n-d slices",
    8: "index entry",
}
DTYPE_KINDS = "biuf"  # booleans, integers, floats (bfloat16 by name)

Box = tuple[tuple[int, int], ...]  # an n-d slice: (start, stop) per axis


class FormatError(ValueError):
    """A file is not in the original release's checkpoint format (the message says where)."""


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """What the index says of one array: its global shape and dtype, and where its pieces are.

    Attributes:
      shape: the whole array's shape.
      dtype: its dtype.
      boxes: the n-d slices the array was cut into (together they cover it exactly once).
      shards: for each box, the data shard holding that piece.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    boxes: tuple[Box, ...]
    shards: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Slices:
    """An n-d slice as the files hold it: one Python `slice` per axis (start/stop may be None)."""

    slices: tuple[slice, ...]

    def box(self, shape: Sequence[int]) -> Box:
        """(start, stop) per axis of an array of `shape`; None becomes 0 / the axis size."""
        if len(self.slices) != len(shape):
            raise FormatError(
                f"an n-d slice of {len(self.slices)} axes cuts an array of shape {tuple(shape)}"
            )
        box = []
        for s, size in zip(self.slices, shape, strict=True):
            if s.step not in (None, 1):
                raise FormatError(f"slice {s} has step {s.step}; only contiguous slices occur")
            start = 0 if s.start is None else int(s.start)
            stop = size if s.stop is None else int(s.stop)
            box.append((start, stop))
        return tuple(box)


def dtype_from_name(name: str | bytes) -> np.dtype:
    """The NumPy dtype a file names ("float32", "bfloat16", ...); anything else is refused."""
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
    if text == "bfloat16":
        return np.dtype(jnp.bfloat16)
    try:
        dtype = np.dtype(text)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in DTYPE_KINDS:
        raise FormatError(
            f"dtype {text!r} is not an array dtype of parameters; allowed: booleans, integers, "
            "floats and bfloat16"
        )
    return dtype


def _payload(data: bytes) -> Any:
    # Nested payloads: strings may be stored as str or as raw bytes; read both as bytes.
    return msgpack.unpackb(data, raw=True, strict_map_key=False)


def _array(data: bytes) -> np.ndarray:
    shape, name, buffer = _payload(data)
    dtype = dtype_from_name(name)
    shape = tuple(int(n) for n in shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buffer) != expected:
        raise FormatError(
            f"an array of shape {shape} and dtype {dtype.name} needs {expected} bytes; the file "
            f"holds {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _slice(data: bytes) -> slice:
    start, stop, step = _payload(data)
    return slice(start, stop, step)


def _slices(data: bytes) -> Slices:
    return Slices(tuple(_slice(item) for item in _payload(data)))


def _index_entry(data: bytes) -> IndexEntry:
    shape_dtype, slices, shards = _payload(data)
    shape, name, _weak_type, _ = _payload(shape_dtype)
    shape = tuple(int(n) for n in shape)
    boxes = tuple(_slices(item).box(shape) for item in slices)
    shards = tuple(int(s) for s in shards)
    if len(boxes) != len(shards):
        raise FormatError(f"an index entry lists {len(boxes)} slices but {len(shards)} shards")
    return IndexEntry(shape, dtype_from_name(name), boxes, shards)


_DECODERS = {
    ARRAY: _array,
    NUMPY_SCALAR: lambda data: _array(data)[()],
    SLICE: _slice,
    SLICE_ND: _slices,
    INDEX_ENTRY: _index_entry,
}


def _ext_hook(code: int, data: bytes) -> Any:
    decoder = _DECODERS.get(code)
    if decoder is None:
        name = CODE_NAMES.get(code, "unknown")
        raise FormatError(
            f"msgpack extension type {code} ({name}) does not occur in parameter checkpoints; "
            f"allowed: {sorted(_DECODERS)}"
        )
    return decoder(data)


def loads(data: bytes) -> Any:
    """The value of one file's bytes (maps with str keys, lists, arrays, `IndexEntry`s, ...)."""
    try:
        return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    except FormatError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise FormatError(f"not a msgpack document ({type(error).__name__}: {error})") from error


# ---------------------------------------------------------------------------------------------
# Writing


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _box_payload(box: Box) -> bytes:
    return _pack([_pack([start, stop, None]) for start, stop in box])


@dataclasses.dataclass(frozen=True)
class BoxValue:
    """An n-d slice to write (as extension type 6)."""

    box: Box


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in DTYPE_KINDS and value.dtype != np.dtype(jnp.bfloat16):
            raise FormatError(f"cannot write an array of dtype {value.dtype}")
        contiguous = np.ascontiguousarray(value)
        return msgpack.ExtType(
            ARRAY, _pack([list(value.shape), value.dtype.name, contiguous.tobytes()])
        )
    if isinstance(value, BoxValue):
        return msgpack.ExtType(SLICE_ND, _box_payload(value.box))
    if isinstance(value, IndexEntry):
        shape_dtype = _pack([list(value.shape), value.dtype.name, False, {}])
        payload = [shape_dtype, [_box_payload(box) for box in value.boxes], list(value.shards)]
        return msgpack.ExtType(INDEX_ENTRY, _pack(payload))
    raise TypeError(f"cannot write a value of type {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """One file's bytes for `value` (maps, lists, numbers, str, arrays, `BoxValue`,
    `IndexEntry`)."""
    return msgpack.packb(value, default=_default, use_bin_type=True, strict_types=False)
