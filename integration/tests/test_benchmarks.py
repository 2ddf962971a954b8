"""The GPU benchmark script runs (on tiny shapes, any backend), so it is ready when a GPU is."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


# Smoke runs of the benchmark scripts (10-60 s each): in `nox -s bench-smoke`, to run where
# benchmarks change; not in the default test run.
BENCH_SMOKE = pytest.mark.skipif(
    os.environ.get("VMOE_BENCH_SMOKE") != "1",
    reason="a benchmark smoke run: `nox -s bench-smoke` (VMOE_BENCH_SMOKE=1)",
)


@BENCH_SMOKE
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


LABELS = ("shape", "tokens", "group", "D", "H", "E", "K", "C", "mode", "capacity")


@pytest.mark.slow
@BENCH_SMOKE
def test_moe_layer_benchmark_rows_run_in_training_mode_at_the_capacity_they_report(tmp_path):
    """The layer, router-share and memory rows measure the MoE layer the way training runs it
    (deterministic=False, gating noise, the training capacity factor), the router-share row's
    router and layer are the same configuration, and each row's labels are what ran (the script
    records the router call made inside the timed layer and labels the row from it)."""
    out = tmp_path / "moe_layer.json"
    script = ROOT / "benchmarks" / "bench_moe_layer.py"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--malloc=default", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    expected_call = {"mode": "train", "noise": True, "C": 1.05}

    (layer,) = report["layers"]
    call = layer["layer's router call"]
    assert {k: call[k] for k in expected_call} == expected_call
    assert [layer[k] for k in ("E", "K", "C", "mode", "capacity")] == [
        call[k] for k in ("E", "K", "C", "mode", "capacity")
    ]
    assert call["G, S, D"] == [layer["tokens"] // layer["group"], layer["group"], layer["D"]]

    assert [r["router"] for r in report["router_share"]] == ["top_k", "bpr"]
    for share in report["router_share"]:
        assert share["router call"] == share["layer's router call"]
        assert {k: share["router call"][k] for k in expected_call} == expected_call
        # The same layer configuration as the layer table's first row (bpr next to top_k).
        assert {k: share[k] for k in LABELS} == {k: layer[k] for k in LABELS}
        assert share["router fwd+bwd ms"] > 0 and share["layer fwd+bwd ms"] > 0

    (memory,) = report["memory"]
    assert (memory["mode"], memory["C"], memory["capacity"]) == ("train", 1.05, layer["capacity"])
    assert all(step["mode"] == "train" for step in report["train"])


@BENCH_SMOKE
def test_train_benchmark_smoke_run_times_the_trainer_against_the_bare_loop(tmp_path):
    """bench_train.py on a few steps: the trainer, the trainer on batches in memory and the bare
    loop timed over the same steps, on the same batches (the same final loss), the trainers'
    checkpoints written, and the overhead figures in the JSON."""
    out = tmp_path / "train.json"
    script = ROOT / "benchmarks" / "bench_train.py"
    args = ["--steps", "30", "--warmup", "25", "--checkpoint-every", "25", "--repeats", "1"]
    result = subprocess.run(
        [sys.executable, str(script), *args, "--no-fail", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["config"], report["steps"], report["batch_size"]) == ("digits_vmoe", 30, 64)
    (repeat,) = report["repeats"]
    for loop in ("trainer", "trainer-mem", "bare"):
        run = repeat[loop]
        assert (run["from_step"], run["timed_steps"]) == (25, 5)
        assert run["images_per_second"] > 0 and run["cpu_ms_per_step"] > 0
    assert repeat["trainer"]["checkpoints"] == repeat["trainer-mem"]["checkpoints"] == [25, 30]
    assert report["same_final_loss"] is True
    ratio = repeat["trainer img/s"] / repeat["bare img/s"]
    assert report["median_ratio"] == pytest.approx(ratio)
    assert report["median_overhead_percent"] == pytest.approx((1 - ratio) * 100)
    data = 1 - repeat["trainer img/s"] / repeat["trainer-mem img/s"]
    assert report["median_data_percent"] == pytest.approx(data * 100)
    assert report["ok"] == (report["median_overhead_percent"] <= report["max_overhead_percent"])
    assert "trainer/bare" in result.stdout and "overhead" in result.stdout


PACKAGE_BENCHMARKS = sorted(ROOT.glob("packages/*/benchmarks/*.py")) + sorted(
    ROOT.glob("plugins/*/benchmarks/*.py")
)


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", PACKAGE_BENCHMARKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_package_benchmark_imports_only_vmoe_packages_its_package_declares(path):
    """Benchmarks that compare packages live in the root benchmarks/ (which may use them all)."""
    folder = path.parents[1]
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    declared = {project["name"]} | {
        re.split(r"[<>=!~ \[;]", r)[0] for r in project.get("dependencies", [])
    }
    allowed = {name.replace("-", "_") for name in declared}
    ours = {m for m in _imported_modules(path) if m.startswith("vmoe_")}
    assert ours <= allowed, f"{path.relative_to(ROOT)} imports {sorted(ours - allowed)}"


@BENCH_SMOKE
def test_bench_comm_measures_the_expert_strategy_at_8_devices(tmp_path):
    """bench_comm.py on one case: the expert strategy's step sends its buffers by all-to-all and
    otherwise only gradients and statistics (no routing array, attributed by role), and its
    checks pass (the weak-scaling one trivially: one device count)."""
    out = tmp_path / "comm.json"
    args = ["--models", "V-MoE-S/32", "--devices", "8", "--strategies", "expert", "--png", ""]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_comm.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["strategy"], row["devices"], row["mesh"]) == ("expert", 8, "(1, 8)")
    # 4 MoE layers, 2 all-to-alls each way per layer in a train step.
    assert row["all-to-all MB/MoE layer"] == pytest.approx(row["all-to-all MB"] / 4)
    assert row["all-to-all MB"] > 0 and row["all-gather MB"] == 0
    assert row["expert all-to-all MB"] == pytest.approx(row["all-to-all MB"])
    assert row["gradient reduction MB"] > 0 and row["statistics MB"] > 0
    assert row["MoE layer arrays MB"] == 0 and row["planned memory MB"] > 0
