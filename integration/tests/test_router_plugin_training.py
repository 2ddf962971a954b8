"""A few training steps of a plugin router on the embedded digits, chosen by
`--config.model.moe.router=<name>` alone (dropless; expert_choice and soft in
`nox -s tests-extended`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize(
    "router",
    # dropless (no capacity, block routing) in the default run; the others are `extended`.
    ["dropless", *(pytest.param(r, marks=pytest.mark.extended) for r in ("expert_choice", "soft"))],
)
def test_trains_on_digits_from_the_config_alone(router, tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "VMOE_DATA_DIR": str(tmp_path.parent / "digits-data")}
    args = [
        sys.executable,
        "-m",
        "vmoe_train",
        "--config=digits_vmoe",
        f"--config.model.moe.router={router}",
        "--config.num_steps=3",
        "--config.optimizer.warmup_steps=1",
        "--config.batch_size=16",
        "--config.eval_batch_size=32",
        "--config.eval.every_steps=0",
        "--config.checkpoint.every_steps=0",
        "--config.log.every_steps=1",
        "--config.log.callbacks=('jsonl',)",
        "--config.dataset.test_split=''",
        f"--workdir={workdir}",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in logged if "train/loss" in row]
    assert len(losses) == 3 and all(v == v and v < 10 for v in losses), losses
