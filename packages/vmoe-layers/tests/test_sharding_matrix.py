"""Every strategy on every 8-device mesh equals one device, for every router of the project:
top_k, bpr and the plugin routers hash, aux_free (its router state too, after several steps),
expert_choice, soft, dropless (the expert strategies refuse dropless, with the reason) and
group_limited.

80 compiled training steps: too slow for the default run. `nox -s sharding-matrix` runs it
(VMOE_SHARDING_MATRIX=1, the plugins installed); the default run covers BPR and aux_free with
each strategy on one mesh (test_multidevice.py) and the plugin routers under data, expert and
fsdp on (2, 4) (integration/tests/test_router_plugins.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import sharding_case as case

HERE = pathlib.Path(__file__).parent

pytestmark = pytest.mark.skipif(
    os.environ.get("VMOE_SHARDING_MATRIX") != "1",
    reason="the full matrix runs in `nox -s sharding-matrix` (VMOE_SHARDING_MATRIX=1)",
)


@pytest.fixture(scope="module")
def matrix():
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    }
    result = subprocess.run(
        [sys.executable, str(HERE / "multidevice_worker.py"), "--matrix"],
        capture_output=True,
        text=True,
        timeout=3600,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("router", case.MATRIX_ROUTERS)
@pytest.mark.parametrize(
    "name, mesh_shape", case.MATRIX_CASES, ids=[f"{n}-{m}" for n, m in case.MATRIX_CASES]
)
def test_strategy_equals_one_device(matrix, router, name, mesh_shape):
    report = matrix[f"{router}/{name}-{mesh_shape}"]
    if router in case.REFUSED_BY_EXPERT_STRATEGIES and name.startswith("expert"):
        assert case.REFUSED_BY_EXPERT_STRATEGIES[router] in report["error"]
        assert "allowed: the 'data' or 'fsdp' strategy" in report["error"]
        return
    assert "error" not in report, report
    assert report["loss"] == pytest.approx(report["reference_loss"], rel=case.LOSS_RTOL)
    assert report["grad_max_rel_diff"] < case.GRAD_RTOL
    assert report["stats_max_diff"] < case.STATS_ATOL
    if report["router_state_max_diff"] is not None:  # routers with state, after STATE_STEPS
        assert report["router_state_moved"]
        assert report["router_state_max_diff"] < case.STATE_ATOL
    assert report["all_to_all"] == name.startswith("expert")
    assert report["expert_shard_shape"] == case.expected_expert_shard_shape(name, mesh_shape)
