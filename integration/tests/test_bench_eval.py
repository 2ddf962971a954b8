"""benchmarks/bench_eval.py runs and reports every loop it names (a short smoke run)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


# Smoke runs of the benchmark scripts (10-60 s each): in `nox -s bench-smoke`, to run where
# benchmarks change; not in the default test run.
BENCH_SMOKE = pytest.mark.skipif(
    os.environ.get("VMOE_BENCH_SMOKE") != "1",
    reason="a benchmark smoke run: `nox -s bench-smoke` (VMOE_BENCH_SMOKE=1)",
)


@BENCH_SMOKE
def test_eval_benchmark_smoke_run(tmp_path):
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_eval.py"), "--repeats", "1",
         "--split", "test", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["images"] == 364 and report["split"] == "test"
    assert set(report["images_per_second"]) == {
        "evaluator", "eval pipeline", "eval forward", "train forward"
    }  # fmt: skip
    assert all(v > 0 for v in report["images_per_second"].values())
    assert "vs train forward" in result.stdout
