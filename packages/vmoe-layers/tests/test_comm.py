"""Reading collectives and the bytes each device sends from compiled HLO text."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import vmoe_layers as vl

HLO = """
  %all-to-all = (f32[1,2,9,16]{3,2,1,0}, f32[1,2,9,16]{3,2,1,0}) all-to-all(%a, %b), channel_id=1, replica_groups={{0,1},{2,3}}, dimensions={0}
  %all-gather = f32[8,34,8]{2,1,0} all-gather(%x), channel_id=2, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}
  %ars = (f32[4,4]{1,0}, bf16[8]{0}) all-reduce-start(%p, %q), replica_groups=[1,4]<=[4], to_apply=%add
  %ard = (f32[4,4]{1,0}, bf16[8]{0}) all-reduce-done(%ars)
  %reduce-scatter = f32[2,16]{1,0} reduce-scatter(%g), replica_groups={}, dimensions={0}
  %fusion = f32[2]{0} fusion(%all-gather), kind=kLoop
"""  # noqa: E501


def test_collectives_are_read_with_their_shapes_and_group_sizes():
    found = vl.collectives(HLO, num_devices=4)
    assert [(c.kind, c.group_size) for c in found] == [
        ("all-to-all", 2),
        ("all-gather", 4),
        ("all-reduce", 4),
        ("reduce-scatter", 4),
    ]
    assert found[0].shapes == (("f32", (1, 2, 9, 16)), ("f32", (1, 2, 9, 16)))
    assert found[2].result_bytes == 4 * 16 + 2 * 8


def test_bytes_sent_follow_the_ring_model():
    sent = vl.bytes_sent_per_device(HLO, num_devices=4)
    assert sent["all-to-all"] == 2 * 4 * 288 * (1 / 2)
    assert sent["all-gather"] == 4 * 8 * 34 * 8 * (3 / 4)
    assert sent["all-reduce"] == 2 * (4 * 16 + 2 * 8) * (3 / 4)
    assert sent["reduce-scatter"] == 4 * 32 * 4 * (3 / 4)  # the operand is 4x the result
    assert sent["collective-permute"] == 0


def test_a_one_device_program_sends_nothing():
    hlo = jax.jit(lambda x: jnp.sum(x**2)).lower(jnp.ones(8)).compile().as_text()
    assert vl.bytes_sent_per_device(hlo, num_devices=1) == pytest.approx(
        dict.fromkeys(vl.comm.KINDS, 0.0)
    )


def test_each_array_is_attributed_to_its_role_by_shape_and_operation():
    """A kernel [16, 10] split over 2 devices along its last dim, an expert stack [8, 16, 32]
    split 4 x 2: gradients reduced transposed or as a partial gather still count as parameters;
    the gates [8, 34, 8] from a MoE layer's operation are MoE layer arrays, a [8, 8] array from
    elsewhere another array; 8 elements or fewer are statistics; only an explicit all_to_all is
    the expert exchange (one the partitioner inserts for a log_softmax is another array)."""

    class Sharding:  # what ParamShapes.of reads of a sharding: shard_shape
        def __init__(self, split):
            self.split = split

        def shard_shape(self, shape):
            return tuple(d // s for d, s in zip(shape, self.split, strict=True))

    params = {
        "head": jax.ShapeDtypeStruct((16, 10), jnp.float32),
        "experts": jax.ShapeDtypeStruct((8, 16, 32), jnp.float32),
    }
    shapes = vl.ParamShapes.of({"head": Sharding((1, 2)), "experts": Sharding((4, 1, 2))}, params)
    hlo = """
  %ar = (f32[10,16]{1,0}, f32[1,16,5]{2,1,0}, f32[]{:T(128)}, f32[8]{0}) all-reduce(%a, %b, %c, %d), replica_groups=[1,2]<=[2], to_apply=%add
  %ag = f32[2,16,32]{2,1,0} all-gather(%e), replica_groups=[4,2]<=[8], dimensions={2}, metadata={op_name="jit(step)/block_1/moe/etd,edh->eth/dot_general"}
  %gates = f32[8,34,8]{2,1,0} all-gather(%x), replica_groups={}, dimensions={0}, metadata={op_name="jit(step)/jvp(VisionTransformer)/block_1/moe/top_k"}
  %other = f32[8,8]{1,0} all-reduce(%y), replica_groups={}, to_apply=%add, metadata={op_name="jit(step)/block_0/mlp/dot_general"}
  %a2a = f32[1,2,9,16]{3,2,1,0} all-to-all(%z), replica_groups={{0,1}}, dimensions={0}, metadata={op_name="jit(step)/block_1/moe/shard_map/all_to_all"}
  %xla = f32[1,4,125]{2,1,0} all-to-all(%w), replica_groups={{0,1}}, dimensions={0}, metadata={op_name="jit(step)/transpose(jvp(jit(log_softmax)))/add_any"}
"""  # noqa: E501
    sent = vl.bytes_sent_by_role(hlo, num_devices=8, params=shapes, statistic_size=8)
    assert sent["gradient reduction"] == 2 * 4 * (160 + 80) * (1 / 2)
    assert sent["statistics"] == 2 * 4 * (1 + 8) * (1 / 2)
    assert sent["parameter gather"] == 4 * 2 * 16 * 32 * (1 / 2)
    assert sent["MoE layer arrays"] == 4 * 8 * 34 * 8 * (7 / 8)
    assert sent["other arrays"] == 2 * 4 * 64 * (7 / 8) + 4 * 500 * (1 / 2)
    assert sent["expert all-to-all"] == 4 * 288 * (1 / 2)
    assert sum(sent.values()) == pytest.approx(
        sum(vl.bytes_sent_per_device(hlo, num_devices=8).values())
    )
    assert (16, 10) in shapes and (10, 1, 16) in shapes and (16, 5) in shapes
    assert (8, 16, 16) in shapes and (2, 16, 32) in shapes and (4, 16, 32) not in shapes
