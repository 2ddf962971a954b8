"""Routing groups on different devices: per-group noise keys, and statistics combined exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_routing

G, S, D, E = 8, 12, 6, 4


def _tokens():
    return jax.random.normal(jax.random.key(0), (G, S, D))


@pytest.mark.parametrize("name", ["top_k", "bpr"])
def test_routing_a_slice_of_groups_with_its_keys_equals_that_slice_of_the_batch(name):
    router = vmoe_routing.get_router(name, num_experts=E, k=2, capacity_factor=1.0)
    params = router.init(jax.random.key(1), D)
    x, rng = _tokens(), jax.random.key(2)
    whole = router(params, x, rng=rng, deterministic=False)
    keys = vmoe_routing.group_keys(rng, G)
    part = router(params, x[4:], rng=keys[4:], deterministic=False)
    for field in ("token", "expert", "slot", "valid"):
        np.testing.assert_array_equal(getattr(part, field), getattr(whole, field)[4:])
    # Floats from different shapes: XLA does not promise the same rounding (1 ulp apart on
    # some CPUs); the decisions are compared exactly above.
    np.testing.assert_allclose(part.weight, whole.weight[4:], rtol=1e-5, atol=1e-6)


def test_one_key_and_its_group_split_give_the_same_noise():
    rng = jax.random.key(3)
    one = vmoe_routing.gate_noise(rng, (G, S, E))
    split = vmoe_routing.gate_noise(vmoe_routing.group_keys(rng, G), (G, S, E))
    np.testing.assert_array_equal(one, split)
    assert one.shape == (G, S, E)
    assert not np.allclose(one[0], one[1])  # groups draw different noise


def test_raw_uint32_keys_work_too():
    raw = vmoe_routing.group_keys(jax.random.PRNGKey(0), G)
    assert raw.shape == (G, 2)
    assert vmoe_routing.gate_noise(raw, (G, S, E)).shape == (G, S, E)


def test_keys_for_another_number_of_groups_are_refused():
    keys = jax.random.split(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"one key per group \(8 groups\); got keys of shape"):
        vmoe_routing.group_keys(keys, G)


def test_combining_over_shards_averages_means_and_keeps_extremes():
    mesh = jax.make_mesh((1,), ("b",))
    per_device = {"loss": jnp.float32(2.0), "nested": {"sim_max": jnp.float32(3.0)}}
    combined = jax.shard_map(
        lambda s: vmoe_routing.combine_over_shards(s, "b"),
        mesh=mesh,
        in_specs=jax.sharding.PartitionSpec(),
        out_specs=jax.sharding.PartitionSpec(),
    )(per_device)
    assert float(combined["loss"]) == 2.0 and float(combined["nested"]["sim_max"]) == 3.0


COMBINE_ON_FOUR_DEVICES = """
import jax, jax.numpy as jnp, vmoe_routing
from jax.sharding import PartitionSpec as P
assert jax.device_count() == 4
mesh = jax.make_mesh((2, 2), ("a", "b"))

def per_device(_):
    i = (jax.lax.axis_index("a") * 2 + jax.lax.axis_index("b")).astype(jnp.float32)
    stats = {"loss": i, "nested": {"sim_max": 10.0 - i, "sim_min": i + 1.0, "peak_max_mean": i}}
    return vmoe_routing.combine_over_shards(stats, ("a", "b"))

out = jax.shard_map(per_device, mesh=mesh, in_specs=P(), out_specs=P())(jnp.zeros(()))
print(float(out["loss"]), float(out["nested"]["sim_max"]), float(out["nested"]["sim_min"]),
      float(out["nested"]["peak_max_mean"]))
"""


def test_combining_over_four_real_shards(tmp_path):
    """Devices hold different values: means average, *_max / *_min take the extremes (and a
    name merely containing _max is a mean)."""
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
    }
    result = subprocess.run(
        [sys.executable, "-c", COMBINE_ON_FOUR_DEVICES],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [float(v) for v in result.stdout.split()] == [1.5, 10.0, 1.0, 1.5]
