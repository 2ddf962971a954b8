"""`python -m vmoe_layers.strategy_check`, the 8-device check plugins run: the shared-experts
plugin's tests run it under every strategy in the default run; here, as a further case (nox -s
tests-extended), the aux-free router (its state passed to every apply) under the expert
strategy, and a bad strategy name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmoe_layers.strategy_check import run_strategy_check

pytestmark = pytest.mark.slow


@pytest.mark.extended
def test_the_check_reports_one_devices_loss_and_gradients_under_a_strategy():
    moe = {"router": "aux_free", "router_options": {"k": 2, "bias_rate": 0.01}}
    report = run_strategy_check(moe, ["expert"])
    assert set(report) == {"expert"}
    case = report["expert"]
    assert case["loss"] == pytest.approx(case["reference_loss"], rel=1e-5)
    assert 0 <= case["grad_max_rel_diff"] < 1e-4
    assert case["init_sharded"] == {"values_match": True, "layout_ok": True}
    # 4 experts w_in [4, 16, 32] over the 'expert' axis of size 4; the gate whole everywhere.
    assert case["shard_shapes"]["experts/w_in"] == [1, 16, 32]
    assert case["specs"]["experts/w_in"] == ["expert"]
    assert case["shard_shapes"]["router/gate"] == [16, 4]


def test_a_bad_strategy_name_is_refused():
    result = subprocess.run(
        [sys.executable, "-m", "vmoe_layers.strategy_check", "--strategies", "exper"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "--strategies: unknown ['exper']; allowed: ['data', 'expert', 'fsdp'" in result.stderr
