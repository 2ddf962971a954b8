"""Evaluating a run whose routers keep state (the aux-loss-free router, plugin
vmoe-router-aux-free in this package's test extra): `load_run` reads the balancing bias from
the checkpoint, and every evaluation (accuracy, the routing analysis, the capacity sweep)
routes with it, as the trainer's own evaluation did."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from eval_worker import tiny_config

import vmoe_train
from vmoe_eval import capacity_sweep, evaluators, loading, routing_stats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def aux_free_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("aux-free")
    config = tiny_config(
        ["model.moe.router=aux_free", "model.moe.router_options.bias_rate=0.05", "num_steps=12"]
    )
    summary = vmoe_train.train(config, workdir)
    return workdir, summary


def _bias(router_state) -> np.ndarray:
    return np.asarray(router_state["block_1"]["moe"]["router"]["bias"])


def test_load_run_reads_the_router_state_and_evaluates_as_the_trainer_did(aux_free_run):
    workdir, summary = aux_free_run
    run = loading.load_run(workdir)
    saved = vmoe_train.checkpoints.restore_router_state(workdir / "checkpoints", run.step)
    np.testing.assert_array_equal(_bias(run.router_state), _bias(saved))
    assert np.abs(_bias(run.router_state)).max() > 0  # 12 steps moved it
    assert set(run.variables) == {"params", "router_state"}

    accuracy = evaluators.get_evaluator("accuracy", split="test").evaluate(run)
    assert accuracy["test/accuracy"] == summary["test/accuracy"]

    # The bias decides selections: zeroing it changes some routing decisions.
    analysis = routing_stats.routing_analysis(run, "test")
    zeroed = loading.LoadedRun(
        run.path,
        run.step,
        run.config,
        run.setup,
        run.params,
        {"block_1": {"moe": {"router": {"bias": jnp.zeros(4)}}}},
    )
    unbiased = routing_stats.routing_analysis(zeroed, "test")
    layer, other = analysis.layers["moe_block_1"], unbiased.layers["moe_block_1"]
    assert layer.counts.sum() > 0
    assert not np.array_equal(layer.counts, other.counts)

    points = capacity_sweep.sweep(run, capacity_factors=(1.05,), ks=(2,), routers=("aux_free",))
    assert points[0]["accuracy"] == pytest.approx(summary["test/accuracy"])


def test_a_checkpoint_without_the_state_its_routers_need_is_refused(trained):
    # The session's top_k run, loaded as if its routers were aux_free.
    with pytest.raises(ValueError, match=r"keep state .* has none"):
        loading.load_run(trained[0], overrides=["model.moe.router=aux_free"])
