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


def _fewshot(base):
    return {"1": base, "5": base + 0.05, "10": base + 0.1}


def test_dense_twin_rows_are_means_over_seeds():
    per_run = {
        training: [
            {
                "model": model,
                "steps": steps + 10 * seed * (steps > 2000),
                "train_seconds": seconds + seed,
                "test_accuracy": accuracy + 0.01 * seed,
                "fewshot": _fewshot(accuracy - 0.1 + 0.01 * seed),
            }
            for seed in range(3)
        ]
        for training, model, steps, seconds, accuracy in (
            ("vmoe_top_k", "V-MoE-Mu/2", 2000, 60.0, 0.9),
            ("vit", "ViT-Mu/2", 2000, 30.0, 0.8),
            ("vit_equal_time", "ViT-Mu/2", 4000, 58.0, 0.85),
        )
    }
    rows = report.aggregate("b_dense", per_run)["rows"]
    assert [r["training"] for r in rows] == ["vmoe_top_k", "vit", "vit_equal_time"]
    assert rows[2]["steps"] == [4000, 4010, 4020] and rows[1]["steps"] == [2000] * 3
    assert rows[2]["train_seconds"]["mean"] == pytest.approx(59.0)
    assert rows[1]["accuracy"]["mean"] == pytest.approx(0.81)
    assert rows[1]["fewshot"]["10"]["mean"] == pytest.approx(0.81)
    assert rows[1]["fewshot"]["10"]["std"] == pytest.approx(statistics.stdev([0.8, 0.81, 0.82]))
    text = report.tables({"b_dense": {"rows": rows}})
    assert "| vit_equal_time | ViT-Mu/2 | 4000-4020 | 59 ± 1 | 86.0 ± 1.0 | 76.0 ± 1.0 |" in text
    assert "| vit | ViT-Mu/2 | 2000 | 31 ± 1 |" in text


def test_transfer_rows_pair_each_model_with_its_own_runs():
    def runs(accuracy, **extra):
        return [
            {"model": "M", "steps": 500, "test_accuracy": accuracy + 0.01 * s, **extra}
            for s in range(3)
        ]

    per_run = {}
    for family, offset in (("vmoe", 0.0), ("vit", -0.1)):
        per_run[f"{family}_first_half"] = runs(
            0.95 + offset,
            classes=[0, 1, 2, 3, 4],
            transfer_classes=[5, 6, 7, 8, 9],
            transfer_fewshot=_fewshot(0.6 + offset),
        )
        per_run[f"{family}_finetuned"] = runs(0.9 + offset)
        per_run[f"{family}_scratch_second_half"] = runs(0.7 + offset)
    data = report.aggregate("e_transfer", per_run)
    assert data["pretrain_classes"] == [0, 1, 2, 3, 4]
    assert data["transfer_classes"] == [5, 6, 7, 8, 9]
    vit = data["models"]["vit"]
    assert vit["pretrain_accuracy"]["mean"] == pytest.approx(0.86)
    assert vit["transfer_fewshot"]["5"]["mean"] == pytest.approx(0.55)
    assert vit["finetuned_accuracy"]["mean"] == pytest.approx(0.81)
    assert vit["scratch_accuracy"]["mean"] == pytest.approx(0.61)
    text = report.tables({"e_transfer": data})
    assert "from classes 0,1,2,3,4 to classes 5,6,7,8,9" in text
    assert (
        "| M | 86.0 ± 1.0 | 50.0 ± 0.0 | 55.0 ± 0.0 | 60.0 ± 0.0 | 81.0 ± 1.0 | 61.0 ± 1.0 |"
        in text
    )


def _upcycle_runs(seeds=(0, 1, 2)):
    """Claim g's runs: accuracy base + 0.01 * seed, train seconds base + seed; the lists are
    given in another seed order than the source's (the arms pair runs by seed)."""

    def runs(model, steps, seconds, accuracy, order=1):
        return [
            {
                "seed": s,
                "model": model,
                "steps": steps,
                "train_seconds": seconds + s,
                "test_accuracy": accuracy + 0.01 * s,
            }
            for s in seeds[::order]
        ]

    return {
        "vit_upcycle_source": runs("ViT-Mu/2", 1000, 30.0, 0.90),
        "vit_continued": runs("ViT-Mu/2", 1000, 31.0, 0.93, order=-1),
        "vmoe_upcycled": runs("V-MoE-Mu/2", 1000, 35.0, 0.96, order=-1),
        "vmoe_top_k": runs("V-MoE-Mu/2", 2000, 62.0, 0.935),
    }


def test_upcycle_arms_add_the_source_time_to_each_continuation_seed_by_seed():
    data = report.aggregate("g_upcycle", _upcycle_runs())
    arms = {arm["arm"]: arm for arm in data["arms"]}
    assert list(arms) == ["source", "dense", "upcycled", "scratch"]
    upcycled = arms["upcycled"]
    totals = [30.0 + s + 35.0 + s for s in range(3)]
    assert upcycled["total_seconds"]["mean"] == pytest.approx(statistics.mean(totals))
    assert upcycled["total_seconds"]["std"] == pytest.approx(statistics.stdev(totals))
    assert upcycled["accuracy"]["mean"] == pytest.approx(0.97)  # the continuation's, not the sum
    assert upcycled["steps"] == [[1000] * 3, [1000] * 3]
    assert arms["scratch"]["total_seconds"]["mean"] == pytest.approx(63.0)
    assert arms["source"]["accuracy"]["mean"] == pytest.approx(0.91)
    text = report.tables({"g_upcycle": data})
    assert (
        "| (ii) upcycled | vit_upcycle_source + vmoe_upcycled | V-MoE-Mu/2 | 1000 + 1000 | "
        "31 + 36 = 67 ± 2 | 97.0 ± 1.0 |" in text
    )
    assert (
        "| (iii) V-MoE from scratch | vmoe_top_k | V-MoE-Mu/2 | 2000 | 63 ± 1 | 94.5 ± 1.0 |"
        in text
    )
    assert data["finding"] in text


def test_upcycle_finding_is_written_from_the_numbers():
    finding = report.aggregate("g_upcycle", _upcycle_runs())["finding"]
    # upcycled 97.0 ± 1.0 vs dense 94.0 ± 1.0: 3.0 points apart, beyond the spread sqrt(2) = 1.4
    assert "3.0 points above continuing dense (94.0%)" in finding
    # vs from scratch 94.5 ± 1.0: 2.5 points, beyond the spread too
    assert "2.5 points above the V-MoE from scratch (94.5%)" in finding
    assert "in 67 s of training against 63 s dense and 63 s from scratch" in finding
    assert "data-limited" in finding and "need not come from the experts'" in finding
    runs = _upcycle_runs()
    for run in runs["vmoe_upcycled"]:
        run["test_accuracy"] -= 0.025  # 94.5%: 0.5 points over dense, within the spread
    finding = report.aggregate("g_upcycle", runs)["finding"]
    assert "level with continuing dense (94.0%; +0.5 points, within the seeds' spread of 1.4)" in (
        finding
    )
    assert "is not to be expected" in finding
    one_seed = report.aggregate("g_upcycle", _upcycle_runs(seeds=(0,)))["finding"]
    assert "one seed: no spread" in one_seed


def test_an_upcycled_run_without_its_source_seed_is_an_error():
    runs = _upcycle_runs()
    runs["vit_upcycle_source"] = runs["vit_upcycle_source"][:2]
    with pytest.raises(
        ValueError, match=r"missing \(training, seed\): \[\('vit_upcycle_source', 2\)"
    ):
        report.aggregate("g_upcycle", runs)


def _h_run(training, seed, accuracy, cv_scale, flops):
    """A claim-h per-run result: 20 logged steps, load CV cv_scale * (seed + 1) * step / 1000."""
    steps = list(range(25, 525, 25))
    return {
        "training": training,
        "seed": seed,
        "test_accuracy": accuracy + 0.01 * seed,
        "train_seconds": 60.0 + seed,
        "training_curve": {
            "step": steps,
            "load_cv": [cv_scale * (seed + 1) * s / 1000 for s in steps],
            "dropped_fraction": [cv_scale * s / 10000 for s in steps],
        },
        "moe_flops": flops,
    }


def _flops(experts, width, k, router, branches=0.0):
    expert = 4 * 64 * width
    return {
        "experts": experts,
        "expert_width": width,
        "router": router,
        "expert": expert,
        "k": k,
        "routed": k * expert,
        "capacity": 40,
        "buffers": experts * 40 * expert / 136,
        "branches": {"shared_experts": branches} if branches else {},
        "total": 0.0,
    }


def test_balance_claim_means_the_last_tenth_and_writes_its_sentence():
    arms = (("h_aux_loss", 0.95, 0.5), ("h_aux_free", 0.96, 0.1), ("h_no_balance", 0.90, 2.0))
    per_run = {
        t: [_h_run(t, s, a, scale, _flops(16, 128, 2, 2048)) for s in (0, 1, 2)]
        for t, a, scale in arms
    }
    data = report.aggregate("h_balance", per_run)
    rows = {row["training"]: row for row in data["rows"]}
    # The last tenth of 20 logged steps: the last 2 (475, 500), averaged, then over seeds.
    cv = [scale * (s + 1) * (475 + 500) / 2000 for s in (0, 1, 2) for scale in (0.1,)]
    assert rows["h_aux_free"]["final_load_cv"]["mean"] == pytest.approx(statistics.mean(cv))
    assert rows["h_aux_free"]["final_load_cv"]["std"] == pytest.approx(statistics.stdev(cv))
    assert rows["h_no_balance"]["accuracy"]["mean"] == pytest.approx(0.91)
    assert (
        "CV is 0.10 with the aux-loss-free bias, 0.49 with V-MoE's aux losses" in (data["finding"])
    )
    text = report.tables({"h_balance": data})
    assert "| aux-loss-free bias | h_aux_free | 97.0 ± 1.0 |" in text
    assert data["finding"] in text


def test_granularity_claim_states_the_expert_flops_of_each_model():
    models = (
        ("h_coarse", _flops(4, 128, 2, 512)),
        ("h_fine", _flops(16, 32, 8, 2048)),
        ("h_shared", _flops(4, 128, 1, 512, branches=4 * 64 * 128)),
    )
    per_run = {t: [_h_run(t, s, 0.95, 1.0, f) for s in (0, 1, 2)] for t, f in models}
    data = report.aggregate("h_granularity", per_run)
    assert {row["expert_flops"] for row in data["rows"]} == {2 * 4 * 64 * 128}
    assert data["finding"].startswith("At equal expert FLOPs per token (65,536 per MoE layer)")
    assert "the fine-grained gate costs 4x the coarse one's FLOPs (2,048, 3% of" in data["finding"]
    text = report.tables({"h_granularity": data})
    assert "| coarse K=1 + 1 shared | h_shared | 4 x 128, K=1 + 1 shared | 65,536 | 512 |" in text


def test_readme_tables_are_the_committed_results():
    """The README quotes docs/results/summary.md, which is `tables(load(docs/results))`."""
    results = ROOT / "docs" / "results"
    text = report.tables(report.load(results))
    assert (results / "summary.md").read_text() == text
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- reproduce: tables -->", "<!-- reproduce: end of tables -->"
    quoted = readme[readme.index(begin) + len(begin) : readme.index(end)]
    assert quoted.strip() == text.strip()
