"""Routing analysis: the expert x class counts sum to tokens x K - dropped per layer (checked
against the layers' own metrics), padding is left out, NMI is a normalised mutual information,
and the heatmaps / position maps / routing.json / routing.md are written and readable."""

from __future__ import annotations

import dataclasses
import json

import jax
import matplotlib.image
import numpy as np
import pytest

import vmoe_layers as vl
from vmoe_eval import loading
from vmoe_eval import routing_stats as routing_analysis
from vmoe_train import setup as setup_lib
from vmoe_train import steps

TEST_EXAMPLES = 364  # the embedded digits' test split
TOKENS = 5  # 2 x 2 patches of 4 x 4 pixels + the class token


def _layer_metrics(run, split, batch_size, **overrides):
    """{layer: (dropped choices, tokens with no expert)} from the layers' own metrics (means
    over routing groups, all of equal size), over batches without padding."""
    model = loading.with_routing(run.model, overrides.pop("router", None))
    k = overrides.get("k") or 2
    apply_fn = jax.jit(lambda v, x: model.apply(v, x, **overrides).metrics)
    totals = {}
    for metrics, batch in loading.forward(run, split, batch_size=batch_size, apply_fn=apply_fn):
        assert np.all(batch["mask"]), "the batch size must divide the split"
        tokens = len(batch["mask"]) * TOKENS
        for name, layer in metrics.items():
            dropped, no_expert = totals.get(name, (0.0, 0.0))
            totals[name] = (
                dropped + float(layer["dropped_fraction"]) * tokens * k,
                no_expert + float(layer["no_expert_fraction"]) * tokens,
            )
    return {name: (round(d), round(n)) for name, (d, n) in totals.items()}


def _check_sums(analysis, expected, k):
    assert set(analysis.layers) == set(expected)
    for name, layer in analysis.layers.items():
        dropped, no_expert = expected[name]
        tokens = analysis.examples * TOKENS
        assert layer.tokens == tokens and layer.choices == tokens * k
        assert dropped > 0, "pick a capacity that drops something"
        assert int(layer.counts.sum()) == tokens * k - dropped  # tokens x K - dropped
        assert layer.dropped == dropped and layer.no_expert_tokens == no_expert
        assert int(layer.position_counts.sum()) == int(layer.counts.sum())
        assert np.all(layer.counts >= 0)


@pytest.fixture(scope="module")
def analysis(trained_run):
    """The trained model's routing on the test split, as trained (K=2, C=1.05), batch 64: the
    last batch holds 20 padded copies, which must not be counted."""
    return routing_analysis.routing_analysis(trained_run, "test")


def test_counts_sum_to_tokens_times_k_minus_dropped(trained_run):
    # 364 = 7 x 52: no padding, so the layers' metrics (over groups) count the same tokens.
    for options in ({"capacity_factor": 0.5}, {"router": "bpr", "k": 1, "capacity_factor": 0.75}):
        result = routing_analysis.routing_analysis(trained_run, "test", batch_size=52, **options)
        assert result.examples == TEST_EXAMPLES and result.k == options.get("k", 2)
        assert result.router == options.get("router", "top_k")
        expected = _layer_metrics(trained_run, "test", 52, **options)
        _check_sums(result, expected, result.k)


def test_counts_per_layer_of_a_two_layer_moe(tmp_path):
    """Every MoE layer gets its own matrices, named as the model's metrics (untrained
    parameters are enough: the check is bookkeeping)."""
    from eval_worker import tiny_config

    config = tiny_config(["model.moe.layers=every-1"])
    setup = setup_lib.build(config)
    init = steps.init_model(setup.model)
    params = jax.jit(init.init)(jax.random.key(0), setup.sample_images)["params"]
    run = loading.LoadedRun(tmp_path, 0, config, setup, vl.shard_params(setup.strategy, params))
    result = routing_analysis.routing_analysis(run, "test", batch_size=52, capacity_factor=0.5)
    assert list(result.layers) == ["moe_block_0", "moe_block_1"]
    _check_sums(result, _layer_metrics(run, "test", 52, capacity_factor=0.5), 2)


def test_padding_is_not_counted(analysis):
    assert analysis.examples == TEST_EXAMPLES
    assert (analysis.router, analysis.k, analysis.capacity) == ("top_k", 2, 6)  # ceil(2*1.05*10/4)
    assert analysis.num_experts == 4 and analysis.num_classes == 10
    layer = analysis.layers["moe_block_1"]
    assert layer.choices == TEST_EXAMPLES * TOKENS * 2
    assert 0 <= layer.dropped < layer.choices
    # Every token of every real image is somewhere in the position counts (or dropped).
    assert layer.position_counts.shape == (4, TOKENS)
    assert int(layer.position_counts.sum()) == layer.choices - layer.dropped
    # A token is in an expert's buffer at most once: no expert sees a position more often than
    # there are images.
    assert layer.position_counts.max() <= TEST_EXAMPLES


def test_mean_weights_and_position_grid(analysis):
    layer = analysis.layers["moe_block_1"]
    weights = layer.mean_weight
    assert weights.shape == (4, 10)
    assert np.all((weights >= 0) & (weights <= 1))
    assert np.all((weights > 0) == (layer.counts > 0))
    grid = analysis.position_grid("moe_block_1")
    assert grid.shape == (4, 2, 2) and analysis.class_token
    assert np.array_equal(grid.reshape(4, 4), layer.position_counts[:, 1:])
    order = layer.expert_order()
    assert sorted(order.tolist()) == [0, 1, 2, 3]


def test_nmi():
    nmi = routing_analysis.normalized_mutual_information
    assert nmi(np.eye(4) * 7) == pytest.approx(1.0)  # each expert one class, and back
    assert nmi(np.ones((4, 10))) == pytest.approx(0.0, abs=1e-12)  # independent
    assert nmi(np.outer([1, 2, 3], [4, 1, 1, 2])) == pytest.approx(0.0, abs=1e-12)
    assert nmi(np.zeros((4, 10))) == 0.0
    assert nmi(np.array([[5, 3, 2]])) == 0.0  # one expert: H(E) = 0
    partial = nmi(np.array([[8, 2], [1, 9]]))
    assert 0.0 < partial < 1.0
    # Against a direct computation: I / sqrt(H(E) H(C)).
    p = np.array([[8, 2], [1, 9]]) / 20
    pe, pc = p.sum(1), p.sum(0)
    mi = np.sum(p * np.log(p / np.outer(pe, pc)))
    h = lambda q: -np.sum(q * np.log(q))  # noqa: E731
    assert partial == pytest.approx(mi / np.sqrt(h(pe) * h(pc)))


def test_nmi_of_the_trained_model_is_in_range(analysis):
    for layer in analysis.layers.values():
        assert 0.0 <= layer.nmi <= 1.0


def test_expert_order_puts_specialists_on_a_diagonal():
    counts = np.array([[0, 9, 1], [8, 1, 1], [1, 1, 8], [5, 4, 1]])
    # Expert 1 and 3 prefer class 0 (1 more strongly), expert 0 class 1, expert 2 class 2.
    assert routing_analysis.expert_order(counts).tolist() == [1, 3, 0, 2]


def test_write_routing_outputs(analysis, tmp_path):
    paths = routing_analysis.write_routing(analysis, tmp_path / "routing")
    pngs = paths["heatmaps"] + paths["positions"]
    assert [p.name for p in pngs] == ["routing_moe_block_1.png", "positions_moe_block_1.png"]
    for path in pngs:
        assert path.stat().st_size > 1000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and float(np.std(image)) > 0

    data = json.loads(paths["json"].read_text())
    layer = analysis.layers["moe_block_1"]
    assert data["model"] == "V-MoE-Nano/4" and data["examples"] == TEST_EXAMPLES
    assert data["patch_grid"] == [2, 2] and data["tokens_per_image"] == TOKENS
    saved = data["layers"]["moe_block_1"]
    assert saved["nmi"] == pytest.approx(layer.nmi)
    assert saved["dropped"] == layer.dropped and saved["selected"] == layer.selected
    assert np.array_equal(saved["counts"], layer.counts)
    assert np.array_equal(saved["position_counts"], layer.position_counts)

    table = paths["markdown"].read_text()
    assert "| layer | NMI(expert; class) |" in table
    assert f"| moe_block_1 | {layer.nmi:.3f} | {layer.dropped} (" in table


def test_a_dense_model_is_a_clear_error(trained_run):
    dense = dataclasses.replace(
        trained_run,
        setup=dataclasses.replace(trained_run.setup, model=trained_run.model.clone(moe=None)),
    )
    with pytest.raises(ValueError, match="has no MoE layer"):
        routing_analysis.routing_analysis(dense, "test")
