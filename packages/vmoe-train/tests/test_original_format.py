"""The original V-MoE release's checkpoint files: written and read back; read when hand-made."""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import original_reference as reference
import pytest

import vmoe_layers as vl
from vmoe_train.original import (
    FormatError,
    export_params,
    params_from_original,
    read_checkpoint,
    read_index,
    write_checkpoint,
)
from vmoe_train.original.files import shard_path

EXPERTS = "/Moe/Mlp/"


@pytest.fixture(scope="module")
def tree():
    return reference.original_tree(np.random.default_rng(0))


def test_a_small_vmoe_tree_reads_back_array_for_array(tmp_path, tree):
    # Experts split over 2 shards along E (as the release stored them), replicated arrays
    # spread over both, every chunk cut into pieces of at most 100 bytes.
    written = write_checkpoint(
        tmp_path / "ckpt", tree, num_shards=2, split=lambda p: EXPERTS in p, piece_bytes=100
    )
    assert [p.name for p in written] == [
        "ckpt.index",
        "ckpt.data-00000-of-00002",
        "ckpt.data-00001-of-00002",
    ]
    back = read_checkpoint(tmp_path / "ckpt")
    assert sorted(back) == sorted(tree)
    for path, array in tree.items():
        assert back[path].dtype == array.dtype and back[path].shape == array.shape, path
        np.testing.assert_array_equal(back[path], array, err_msg=path)
    entries, count = read_index(tmp_path / "ckpt.index")  # the .index file names it too
    kernel = entries["Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"]
    assert count == 2 and kernel.shards == (0, 1)
    assert kernel.boxes == (((0, 2), (0, 32), (0, 64)), ((2, 4), (0, 32), (0, 64)))
    assert {len(e.boxes) for p, e in entries.items() if EXPERTS not in p} == {1}


def test_dtypes_and_odd_shapes_round_trip(tmp_path):
    arrays = {
        "a/bf16": np.arange(6, dtype=np.float32).reshape(2, 3).astype(jnp.bfloat16),
        "a/int": np.arange(5, dtype=np.int32),
        "a/scalar": np.float32(3.5) * np.ones((), np.float32),
        "a/empty": np.zeros((0, 3), np.float32),
        "a-b/x": np.ones((1,), np.float64),  # "a-b" sorts before "a/..." as a path, not as a key
    }
    write_checkpoint(tmp_path / "c", arrays, piece_bytes=4)
    back = read_checkpoint(tmp_path / "c")
    for path, array in arrays.items():
        assert back[path].dtype == array.dtype and back[path].shape == array.shape
        np.testing.assert_array_equal(back[path].astype(np.float64), array.astype(np.float64))


def _ext(code, payload):
    return msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True))


def _box(*pairs):
    return [msgpack.packb([start, stop, None], use_bin_type=True) for start, stop in pairs]


def test_files_laid_out_by_hand_as_the_release_does_are_read(tmp_path):
    """Independent of our writer: the index and the shard built with msgpack from the format
    description (index entries, slices with None bounds, arrays in two pieces)."""
    kernel = np.arange(12, dtype=np.float32).reshape(2, 3, 2)  # [E=2, D=3, H=2]
    bias = np.array([0.5, -1.5], np.float32)

    def array(x):
        return _ext(1, [list(x.shape), x.dtype.name, x.tobytes()])

    def entry(shape, boxes, shards):
        shape_dtype = msgpack.packb([list(shape), "float32", False, {}], use_bin_type=True)
        boxes = [msgpack.packb(b, use_bin_type=True) for b in boxes]
        return _ext(8, [shape_dtype, boxes, shards])

    index = {
        "shard_count": 2,
        "version": "20220622",
        "index": {
            "b": {"bias": entry((2,), [_box((None, None))], [1])},  # array 0
            "k": {
                "kernel": entry(
                    (2, 3, 2), [_box((0, 1), (0, 3), (0, 2)), _box((1, 2), (0, 3), (0, 2))], [0, 1]
                )
            },
        },
    }
    magic = "__msgpack_array_chunk_a87ca2__"
    slice_nd = lambda *pairs: _ext(6, _box(*pairs))  # noqa: E731
    shard0 = {magic: True, "1": [[[array(kernel[0].ravel())], slice_nd((0, 1), (0, 3), (0, 2))]]}
    flat1 = kernel[1].ravel()
    shard1 = {
        magic: True,
        "0": [[[array(bias)], slice_nd((None, None))]],
        "1": [[[array(flat1[:4]), array(flat1[4:])], slice_nd((1, 2), (0, 3), (0, 2))]],
    }
    (tmp_path / "h.index").write_bytes(msgpack.packb(index, use_bin_type=True))
    shard_path(tmp_path / "h", 0, 2).write_bytes(msgpack.packb(shard0, use_bin_type=True))
    shard_path(tmp_path / "h", 1, 2).write_bytes(msgpack.packb(shard1, use_bin_type=True))
    back = read_checkpoint(tmp_path / "h")
    np.testing.assert_array_equal(back["k/kernel"], kernel)
    np.testing.assert_array_equal(back["b/bias"], bias)


def test_nil_leaves_of_a_saved_training_state_are_not_arrays(tmp_path):
    """A whole training state's index holds nil where the tree held None (jax does not number
    them): the arrays after it keep their numbers."""
    a, b = np.ones(2, np.float32), np.arange(3, dtype=np.float32)

    def entry(x):
        shape_dtype = msgpack.packb([list(x.shape), "float32", False, {}], use_bin_type=True)
        slice_nd = msgpack.packb(_box((0, x.size)), use_bin_type=True)
        return _ext(8, [shape_dtype, [slice_nd], [0]])

    def chunk(x):
        pieces = [_ext(1, [list(x.shape), "float32", x.tobytes()])]
        return [[pieces, _ext(6, _box((0, x.size)))]]

    index = {"shard_count": 1, "version": "20220622"}
    index["index"] = {"opt_state": {"a": entry(a), "mask": None}, "params": {"b": entry(b)}}
    shard = {"__msgpack_array_chunk_a87ca2__": True, "0": chunk(a), "1": chunk(b)}
    (tmp_path / "s.index").write_bytes(msgpack.packb(index, use_bin_type=True))
    shard_path(tmp_path / "s", 0, 1).write_bytes(msgpack.packb(shard, use_bin_type=True))
    back = read_checkpoint(tmp_path / "s")
    assert list(back) == ["opt_state/a", "params/b"]
    np.testing.assert_array_equal(back["params/b"], b)


def test_our_arrays_are_flax_msgpack_arrays(tmp_path, tree):
    """The release's arrays are flax.serialization's (extension type 1): flax reads ours."""
    write_checkpoint(tmp_path / "c", {"head/bias": tree["head/bias"]})
    content = flax.serialization.msgpack_restore(shard_path(tmp_path / "c", 0, 1).read_bytes())
    (pieces, _slice), *_ = content["0"]
    np.testing.assert_array_equal(pieces[0], tree["head/bias"])
    flax_bytes = flax.serialization.msgpack_serialize({"x": tree["head/bias"]})
    from vmoe_train.original.wire import loads

    np.testing.assert_array_equal(loads(flax_bytes)["x"], tree["head/bias"])


def test_our_export_reads_back_the_same(tmp_path):
    model = vl.create_model("V-MoE-Nano/2", num_classes=10, num_experts=4, representation_size=8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    export_params(params, tmp_path / "ours", num_shards=2)
    back = params_from_original(read_checkpoint(tmp_path / "ours"))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_missing_shards_are_named(tmp_path, tree):
    write_checkpoint(tmp_path / "c", tree, num_shards=2, split=lambda p: EXPERTS in p)
    shard_path(tmp_path / "c", 1, 2).unlink()
    with pytest.raises(FileNotFoundError, match=r"c\.data-00001-of-00002"):
        read_checkpoint(tmp_path / "c")


def test_a_missing_index_names_the_file_and_the_ones_there(tmp_path, tree):
    write_checkpoint(tmp_path / "real", tree)
    with pytest.raises(FileNotFoundError, match=r"typo\.index' does not exist.*real\.index"):
        read_checkpoint(tmp_path / "typo")


def test_a_directory_or_a_file_that_is_no_checkpoint_is_named(tmp_path, tree):
    write_checkpoint(tmp_path / "ckpts/s32", tree)
    with pytest.raises(FileNotFoundError, match=r"'.*ckpts\.index' does not exist.*s32\.index"):
        read_checkpoint(tmp_path / "ckpts")  # the folder, not the prefix: its index is named
    (tmp_path / "notes.index").write_text("not a checkpoint\n")
    with pytest.raises(FormatError, match=r"notes\.index: not a msgpack document"):
        read_checkpoint(tmp_path / "notes")
    (tmp_path / "list.index").write_bytes(msgpack.packb([1, 2]))
    with pytest.raises(FormatError, match=r"list\.index: an index holds 'shard_count'.*list"):
        read_checkpoint(tmp_path / "list")


def test_a_garbled_file_is_a_format_error_naming_it(tmp_path, tree):
    write_checkpoint(tmp_path / "c", tree)
    shard = shard_path(tmp_path / "c", 0, 1)
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(FormatError, match=r"c\.data-00000-of-00001"):
        read_checkpoint(tmp_path / "c")


def test_every_problem_of_a_shard_is_reported_at_once(tmp_path):
    arrays = {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}
    write_checkpoint(tmp_path / "c", arrays)
    shard = shard_path(tmp_path / "c", 0, 1)
    content = msgpack.unpackb(shard.read_bytes(), raw=False, strict_map_key=False)
    content["0"][0][0] = [content["1"][0][0][0]]  # 4 values where 6 belong
    content["7"] = []  # an array the index does not have
    shard.write_bytes(msgpack.packb(content, use_bin_type=True))
    with pytest.raises(FormatError) as error:
        read_checkpoint(tmp_path / "c")
    message = str(error.value)
    assert "2 problem(s)" in message
    assert "a: slice [0:2, 0:3] needs 6 elements; the chunk has 4" in message
    assert "array number '7' is not in the index" in message


def test_unknown_versions_and_extension_types_are_refused(tmp_path):
    write_checkpoint(tmp_path / "c", {"a": np.ones(2, np.float32)})
    index = tmp_path / "c.index"
    content = msgpack.unpackb(index.read_bytes(), raw=False)
    index.write_bytes(msgpack.packb({**content, "version": "20990101"}, use_bin_type=True))
    with pytest.raises(FormatError, match="version='20990101' is not known"):
        read_checkpoint(tmp_path / "c")
    index.write_bytes(msgpack.packb({**content, "index": {"a": _ext(7, [])}}, use_bin_type=True))
    with pytest.raises(FormatError, match=r"extension type 7 \(array of n-d slices\)"):
        read_checkpoint(tmp_path / "c")


def test_object_dtypes_are_refused():
    payload = msgpack.packb([[1], "object", b"\0" * 8], use_bin_type=True)
    from vmoe_train.original.wire import loads

    with pytest.raises(FormatError, match="dtype 'object' is not an array dtype"):
        loads(msgpack.packb(msgpack.ExtType(1, payload)))
