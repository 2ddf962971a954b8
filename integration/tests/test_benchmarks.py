"""The GPU benchmark script runs (on tiny shapes, any backend), so it is ready when a GPU is."""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_benchmark_smoke_run(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["peak_tflops"] > 0
    assert [r["path"] for r in report["layer"]] == ["dense K*H", "moe (index)", "moe (einsum)"]
    assert all(r["TFLOP/s"] > 0 and r["fwd+bwd ms"] > 0 for r in report["layer"])
    (matmul,) = report["expert_matmul"]
    for form in ("one GEMM", "batched", "loop", "ragged_dot"):
        assert matmul[f"{form} ms"] > 0
    assert matmul["dtype"] == "bfloat16"
    assert [r["model"] for r in report["train"]] == ["V-MoE", "ViT twin"]
    assert report["train"][0]["step / ViT step"] > 0


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU it would run for real")
def test_gpu_benchmark_refuses_to_run_full_size_without_a_gpu(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0 and "no GPU" in result.stderr
