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
