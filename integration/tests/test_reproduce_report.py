"""reproduce/report.py: the per-claim aggregates over seeds and their tables, on hand-made runs
(means and sample standard deviations computed here the obvious way)."""

from __future__ import annotations

import importlib.util
import pathlib
import statistics

import pytest

ROOT = pathlib.Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("report", ROOT / "reproduce" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def _run(training, seed, k, accuracies, routing):
    """A per-run result whose sweep has accuracy accuracies[(router, k, factor)]; its training
    curve logs 20 steps, load CV (seed + 1) * step / 1000, dropped fraction step / 1000."""
    sweep = [
        {
            "router": r,
            "k": kk,
            "capacity_factor": f,
            "accuracy": a,
            "processed_fraction": f / 2,
            "no_expert_fraction": 0.0,
            "moe_flops_relative": kk * f / k,
        }
        for (r, kk, f), a in accuracies.items()
    ]
    steps = list(range(25, 525, 25))
    curve = {
        "step": steps,
        "load_cv": [(seed + 1) * s / 1000 for s in steps],
        "dropped_fraction": [s / 1000 for s in steps],
    }
    return {
        "training": training,
        "seed": seed,
        "k": k,
        "sweep": sweep,
        "routing": routing,
        "test_accuracy": 0.9 + 0.01 * seed,
        "training_curve": curve,
    }


def _accuracies(base):
    return {
        (r, kk, f): base + 0.01 * f + (0.002 if r == "bpr" else 0) + 0.001 * kk
        for r in ("top_k", "bpr")
        for kk in (1, 2)
        for f in (0.5, 1.0)
    }


ROUTING = {
    "moe_block_1": {"nmi_class": 0.01, "nmi_position": 0.2, "dropped_fraction": 0.05},
    "moe_block_3": {"nmi_class": 0.05, "nmi_position": 0.1, "dropped_fraction": 0.06},
}


@pytest.fixture
def per_run():
    runs = {}
    for training, k in (("vmoe_top_k", 2), ("vmoe_bpr", 2), ("vmoe_k1", 1), ("vmoe_no_aux", 2)):
        runs[training] = [
            _run(
                training,
                seed,
                k,
                _accuracies(0.9 + 0.01 * seed),
                {n: {f: v * (1 + seed) for f, v in layer.items()} for n, layer in ROUTING.items()},
            )
            for seed in range(3)
        ]
    return runs


def test_capacity_curves_are_means_and_sample_stds_over_seeds(per_run):
    curves = report.aggregate("a_bpr", per_run)["curves"]
    assert [(c["training"], c["eval_router"]) for c in curves] == [
        ("vmoe_top_k", "top_k"),
        ("vmoe_top_k", "bpr"),
        ("vmoe_bpr", "top_k"),
        ("vmoe_bpr", "bpr"),
    ]
    point = curves[1]["points"][1]  # vmoe_top_k, bpr, C=1.0
    values = [0.9 + 0.01 * s + 0.01 + 0.002 + 0.002 for s in range(3)]
    assert point["capacity_factor"] == 1.0
    assert point["accuracy"]["mean"] == pytest.approx(statistics.mean(values))
    assert point["accuracy"]["std"] == pytest.approx(statistics.stdev(values))
    assert point["processed_fraction"]["mean"] == pytest.approx(0.5)


def test_k_rows_and_routing_layers(per_run):
    rows = report.aggregate("d_k", per_run)["rows"]
    assert [(r["trained_k"], r["eval_k"]) for r in rows] == [(2, 1), (2, 2), (1, 1), (1, 2)]
    assert rows[0]["moe_flops_relative"] == pytest.approx(0.5)
    assert rows[3]["moe_flops_relative"] == pytest.approx(2.0)
    layers = report.aggregate("c_routing", per_run)["layers"]
    assert list(layers) == ["moe_block_1", "moe_block_3"]
    assert layers["moe_block_3"]["nmi_class"]["mean"] == pytest.approx(0.05 * 2)
    assert layers["moe_block_3"]["nmi_class"]["std"] == pytest.approx(
        statistics.stdev([0.05, 0.1, 0.15])
    )


def test_aux_claim_averages_the_last_tenth_of_the_curve(per_run):
    row = report.aggregate("f_aux", per_run)["trainings"]["vmoe_no_aux"]
    # last tenth of 20 logged steps: steps 475 and 500; seed s: load CV (s + 1) * 0.4875
    finals = [(s + 1) * 0.4875 for s in range(3)]
    assert row["final_load_cv"]["mean"] == pytest.approx(statistics.mean(finals))
    assert row["final_load_cv"]["std"] == pytest.approx(statistics.stdev(finals))
    assert row["final_dropped_fraction"]["mean"] == pytest.approx(0.4875)
    assert row["accuracy"]["mean"] == pytest.approx(0.91)
    assert row["curve"]["load_cv"][-1] == pytest.approx(2 * 0.5)  # mean of 1, 2, 3 x 0.5


def test_tables_show_the_aggregates(per_run):
    aggregates = {c: report.aggregate(c, per_run) for c in ("a_bpr", "c_routing", "d_k", "f_aux")}
    text = report.tables(aggregates)
    assert text.index("**a.") < text.index("**c.") < text.index("**d.") < text.index("**f.")
    assert "| vmoe_no_aux | 91.0 ± 1.0 | 0.975 ± 0.487 | 48.8 ± 0.0 |" in text
    assert "| moe_block_3 | 0.100 ± 0.050 | 0.200 ± 0.100 | 12.0 ± 6.0 |" in text
    assert "| 2 | 1 |" in text and "0.50x" in text


def test_a_missing_sweep_point_is_an_error_naming_the_run(per_run):
    sweep = per_run["vmoe_bpr"][1]["sweep"]
    per_run["vmoe_bpr"][1]["sweep"] = [
        p for p in sweep if (p["router"], p["k"], p["capacity_factor"]) != ("top_k", 2, 0.5)
    ]
    with pytest.raises(ValueError, match="run vmoe_bpr seed 1 has 0 sweep points"):
        report.aggregate("a_bpr", per_run)
