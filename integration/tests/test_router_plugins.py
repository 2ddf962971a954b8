"""The plugin routers and expert types, installed next to the core packages: every plugin router
under the data, expert and fsdp strategies on 8 host devices (one subprocess, shared by the module;
the trainings are in test_router_plugin_training.py, so pytest-xdist runs them beside it)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
PLUGIN_ROUTERS = ("expert_choice", "dropless", "soft")


@pytest.fixture(scope="module")
def eight_devices():
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    }
    result = subprocess.run(
        [sys.executable, str(HERE / "router_sharding_worker.py")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_plugin_is_installed():
    import vmoe_layers
    import vmoe_routing

    assert set(PLUGIN_ROUTERS) <= set(vmoe_routing.available_routers())
    assert {"identity", "low_rank", "mixed_width"} <= set(vmoe_layers.available_expert_types())


@pytest.mark.slow
@pytest.mark.parametrize("router", PLUGIN_ROUTERS)
@pytest.mark.parametrize("strategy", ["data", "expert", "fsdp"])
def test_router_under_strategy_equals_one_device_or_refuses_clearly(
    eight_devices, router, strategy
):
    result = eight_devices[router][strategy]
    if router == "dropless" and strategy == "expert":
        assert "routes without a capacity (BlockRouting)" in result["error"]
        assert "allowed: the 'data' or 'fsdp' strategy" in result["error"]
        return
    assert "error" not in result, result
    assert result["loss"] == pytest.approx(result["reference"], rel=1e-5)
    assert result["grad_diff"] < 1e-4


@pytest.mark.parametrize("dispatch_path", ["index", "einsum"])
def test_dropless_refuses_any_exchange_on_either_dispatch_path(dispatch_path):
    """Also where the einsum path would turn its blocks into capacity-S buffers: an exchange
    whose `run_experts` is not the local one moves buffers between devices, and a dropless
    decision's blocks vary in number with the load (`PerShardExchange`, which runs the experts
    where the tokens are, is allowed: the data and fsdp rows above)."""
    import jax
    import jax.numpy as jnp

    import vmoe_layers

    def wrapping_exchange(moe_fn, router_params, expert_params, x_gsd, keys_g):
        def run(expert_fn, params, x_gecd):  # local, but not the default runner
            return vmoe_layers.run_local_experts(expert_fn, params, x_gecd)

        return moe_fn(router_params, expert_params, x_gsd, keys_g, run)

    layer = vmoe_layers.MoeLayer(
        num_experts=4, mlp_dim=8, router="dropless", group_size=6, dispatch_path=dispatch_path
    )
    x = jnp.ones((2, 6, 4))
    params = layer.init(jax.random.key(0), x)
    layer.apply(params, x)  # without an exchange: fine
    with pytest.raises(ValueError, match=r"routes without a capacity \(BlockRouting\)"):
        layer.clone(exchange=wrapping_exchange).apply(params, x)
