"""Capacity and K sweep on the session's trained digits V-MoE (conftest `trained_run`): the
fraction of tokens processed follows the capacity, full capacity gives the accuracy evaluator's
accuracy, one compilation per distinct point (not per batch), and the CSV / JSON / PNG outputs."""

from __future__ import annotations

import csv
import json
import logging

import jax
import matplotlib.image
import numpy as np
import pytest

from vmoe_eval import capacity_sweep as sweep
from vmoe_eval import evaluators
from vmoe_eval import routing_stats as routing_analysis

FACTORS = (0.05, 0.1, 0.5, 4.0)  # 0.05 and 0.1 round to the same capacity; 4.0 drops nothing
KS = (1, 2)
ROUTERS = ("top_k", "bpr")
TEST_EXAMPLES = 364  # the embedded digits' test split: 6 batches of 64, the last one padded


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def swept(trained_run):
    """(results, compiles of the sweep's function): one sweep over the small grid above."""
    sweep.TRACES.clear()
    handler = _Compiles()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            results = sweep.sweep(trained_run, FACTORS, KS, ROUTERS, split="test")
    finally:
        logger.removeHandler(handler)
    compiles = [m for m in handler.messages if m.startswith("Compiling jit(sweep_point)")]
    return results, compiles


def _line(results, router, k):
    points = [r for r in results if r["router"] == router and r["k"] == k]
    return sorted(points, key=lambda r: r["capacity_factor"])


def test_one_result_per_point_with_its_capacity(swept, trained_run):
    results, _ = swept
    assert [(r["router"], r["k"], r["capacity_factor"]) for r in results] == [
        (router, k, c) for router in ROUTERS for k in KS for c in FACTORS
    ]
    s = trained_run.model.moe.group_size  # 2 images of 4 patches + the class token
    assert s == 10 and all(r["group_size"] == s and r["num_experts"] == 4 for r in results)
    for r in results:
        assert r["model"] == "V-MoE-Nano/4" and r["split"] == "test"
        assert r["examples"] == TEST_EXAMPLES
        want = min(s, int(np.ceil(r["k"] * r["capacity_factor"] * s / 4 - 1e-9)))
        assert r["capacity"] == want
        # FLOPs relative to capacity factor 1.0 with the model's K=2: ceil(2 * 10 / 4) = 5 slots.
        assert r["moe_flops_relative"] == pytest.approx(r["capacity"] / 5)
        assert list(r["layers"]) == ["moe_block_1"]  # "every-2" of 2 blocks


def test_fraction_processed_follows_the_capacity(swept):
    results, _ = swept
    e, s = 4, 10
    for router in ROUTERS:
        for k in KS:
            line = _line(results, router, k)
            processed = [r["layers"]["moe_block_1"]["processed_fraction"] for r in line]
            no_expert = [r["layers"]["moe_block_1"]["no_expert_fraction"] for r in line]
            assert processed == sorted(processed), (router, k, processed)
            assert no_expert == sorted(no_expert, reverse=True), (router, k, no_expert)
            assert processed[-1] == 1.0 and no_expert[-1] == 0.0  # C=4.0: capacity = S
            for r, p, none in zip(line, processed, no_expert, strict=True):
                # No more choices than the buffers hold: E * C_e slots for S * K choices.
                assert 0.0 < p <= e * r["capacity"] / (s * k) + 1e-12, (router, k, r)
                assert r["processed_fraction"] == p  # one MoE layer: the mean is that layer
                assert r["no_expert_fraction"] == none
                if k == 1:  # one choice per token: a token has no expert iff it was dropped
                    assert none == pytest.approx(1.0 - p, abs=1e-12), (router, r)
                else:  # a token with no expert lost its K choices: dropped >= K * no_expert
                    assert none <= 1.0 - p + 1e-12, (router, k, r)
            # Same capacity, same computation: 0.05 and 0.1 both give one slot per expert.
            assert line[0]["capacity"] == line[1]["capacity"] == 1
            assert line[0]["accuracy"] == line[1]["accuracy"]
            assert line[0]["layers"] == line[1]["layers"]


def test_bpr_and_vanilla_keep_as_many_choices_in_the_first_moe_layer(swept):
    """Both routers see the same first MoE layer inputs and choices, and each expert keeps
    min(capacity, its choices): BPR changes which tokens are kept, not how many."""
    results, _ = swept
    for k in KS:
        vanilla, bpr = _line(results, "top_k", k), _line(results, "bpr", k)
        for v, b in zip(vanilla, bpr, strict=True):
            assert v["layers"]["moe_block_1"]["processed_fraction"] == pytest.approx(
                b["layers"]["moe_block_1"]["processed_fraction"], abs=1e-12
            )
        # Full capacity: nothing dropped, the same predictions whatever the filling order.
        assert vanilla[-1]["accuracy"] == bpr[-1]["accuracy"]
        # (Low capacity: no claim that BPR wins on a 200-step model; its accuracies are checked
        # against the accuracy evaluator's at the same point below.)


@pytest.mark.parametrize(
    ("router", "k", "factor"),
    [("top_k", 1, 0.1), ("bpr", 2, 0.5)],
)
def test_low_capacity_accuracy_is_the_accuracy_evaluators(swept, trained_run, router, k, factor):
    """Where tokens are dropped, the sweep's accuracy (routings recomputed beside the forward
    pass) is the plain forward pass's with the same router, K and capacity factor."""
    results, _ = swept
    (point,) = [r for r in _line(results, router, k) if r["capacity_factor"] == factor]
    assert point["layers"]["moe_block_1"]["processed_fraction"] < 1.0  # tokens were dropped
    evaluator = evaluators.get_evaluator(
        "accuracy", split="test", k=k, capacity_factor=factor, router=router
    )
    expected = evaluator.evaluate(trained_run)
    assert point["accuracy"] == expected["test/accuracy"], (router, k, factor)


@pytest.mark.parametrize(("router", "k"), [("top_k", 2), ("bpr", 1)])
def test_full_capacity_accuracy_is_the_accuracy_evaluators(swept, trained_run, router, k):
    results, _ = swept
    full = _line(results, router, k)[-1]
    assert full["capacity_factor"] == 4.0
    evaluator = evaluators.get_evaluator(
        "accuracy", split="test", k=k, capacity_factor=4.0, router=router
    )
    expected = evaluator.evaluate(trained_run)
    assert expected["test/examples"] == TEST_EXAMPLES
    assert full["accuracy"] == expected["test/accuracy"]


def test_compiles_once_per_distinct_point_not_per_batch(swept):
    results, compiles = swept
    distinct = {(r["router"], r["k"], r["capacity"]) for r in results}
    assert len(distinct) == 12 < len(results) == 16
    assert dict(sweep.TRACES) == dict.fromkeys(distinct, 1)  # 6 batches, traced once each
    assert len(compiles) == len(distinct), compiles


def test_processed_fraction_matches_the_routing_analysis(swept, trained_run):
    """Two computations of the kept choices (per-token sums vs the expert x class counts)."""
    results, _ = swept
    point = next(
        r for r in results if (r["router"], r["k"], r["capacity_factor"]) == ("bpr", 2, 0.5)
    )
    analysis = routing_analysis.routing_analysis(
        trained_run, "test", router="bpr", k=2, capacity_factor=0.5
    )
    layer = analysis.layers["moe_block_1"]
    assert analysis.capacity == point["capacity"] == 3
    assert 1 - layer.dropped_fraction == pytest.approx(
        point["layers"]["moe_block_1"]["processed_fraction"], abs=1e-12
    )
    assert layer.no_expert_fraction == pytest.approx(
        point["layers"]["moe_block_1"]["no_expert_fraction"], abs=1e-12
    )


def test_write_sweep_outputs(swept, tmp_path):
    results, _ = swept
    paths = sweep.write_sweep(results, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"sweep.csv", "sweep.json", "sweep.png"}

    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results)
    assert list(rows[0]) == [
        *sweep.FIELDS,
        "moe_block_1/processed_fraction",
        "moe_block_1/no_expert_fraction",
    ]
    for row, result in zip(rows, results, strict=True):
        assert row["router"] == result["router"] and int(row["k"]) == result["k"]
        assert float(row["accuracy"]) == pytest.approx(result["accuracy"])
        assert float(row["moe_block_1/processed_fraction"]) == pytest.approx(
            result["layers"]["moe_block_1"]["processed_fraction"]
        )

    assert json.loads(paths["json"].read_text()) == results

    assert paths["png"].stat().st_size > 1000
    image = matplotlib.image.imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(np.std(image)) > 0  # not a blank canvas


def test_bad_grids_are_errors(trained_run):
    with pytest.raises(ValueError, match="at least one value"):
        sweep.sweep(trained_run, capacity_factors=())
    with pytest.raises(ValueError, match="no sweep results"):
        sweep.write_sweep([], "unused")
