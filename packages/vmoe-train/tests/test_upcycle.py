"""Sparse upcycling through the trainer: `finetune.upcycle` from a dense run or a vit_jax file,
`finetune.init_rules`, and their config errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flax import traverse_util
from train_worker import tiny_config

import vmoe_train
from vmoe_train import vit_jax

pytestmark = pytest.mark.slow

DENSE = ["model.name=ViT-Nano/4", "num_steps=4", "checkpoint.every_steps=4"]
# Exact start: every choice has a slot (E=4, K=2, capacity_factor = E/K) and each token's two
# weights sum to 1; the routers at evaluation are the same.
EXACT_ROUTING = [
    "model.moe.router_options={'k': 2, 'capacity_factor': 2.0, 'normalize_weights': True}",
]
FROZEN = [
    "optimizer.frozen=.*",
    "num_steps=2",
    "optimizer.warmup_steps=1",
    "checkpoint.every_steps=2",
]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dense")
    summary = vmoe_train.train(tiny_config(DENSE), workdir)
    return workdir, summary


@pytest.fixture(scope="module")
def upcycled_run(dense_run, tmp_path_factory):
    """The dense run upcycled, every parameter frozen (its evaluation is its starting point's):
    (summary, params)."""
    source, _ = dense_run
    return _upcycle(tmp_path_factory.mktemp("upcycled"), source, *FROZEN)


def _upcycle(workdir, source, *more):
    overrides = [f"finetune.init_from={source}", "finetune.upcycle=True", "finetune.new_head=False"]
    config = tiny_config([*overrides, *EXACT_ROUTING, *more])
    return vmoe_train.train(config, workdir), vmoe_train.restore_params(workdir / "checkpoints")


def test_an_upcycled_run_starts_as_its_dense_twin_every_expert_its_blocks_mlp(dense_run, tmp_path):
    source, dense_summary = dense_run
    # Every parameter frozen: the run's evaluation is its starting point's.
    summary, params = _upcycle(tmp_path / "up", source, *FROZEN)
    dense = vmoe_train.restore_params(source / "checkpoints")
    for name in ("w_in", "b_in", "w_out", "b_out"):
        experts = params["block_1"]["moe"]["experts"][name]
        assert experts.shape == (4, *dense["block_1"]["mlp"][name].shape)
        for e in range(4):
            np.testing.assert_array_equal(experts[e], dense["block_1"]["mlp"][name])
    np.testing.assert_array_equal(params["block_0"]["mlp"]["w_in"], dense["block_0"]["mlp"]["w_in"])
    assert params["block_1"]["moe"]["router"]["gate"].shape == (32, 4)  # fresh
    # The same predictions as the dense model: equal accuracy and loss on validation.
    for key in ("validation/accuracy", "validation/loss"):
        assert summary[key] == pytest.approx(dense_summary[key], rel=1e-5), key


def test_upcycling_from_the_vit_jax_file_of_the_dense_run_gives_the_same_params(
    dense_run, upcycled_run, tmp_path
):
    source, _ = dense_run
    dense = vmoe_train.restore_params(source / "checkpoints")
    npz = tmp_path / "dense.npz"
    vit_jax.save_npz(npz, vit_jax.params_to_vit_jax(dense))
    _, from_run = upcycled_run
    _, from_npz = _upcycle(tmp_path / "b", npz, *FROZEN)
    flat = lambda tree: traverse_util.flatten_dict(tree, sep="/")  # noqa: E731
    assert flat(from_run).keys() == flat(from_npz).keys()
    for path, value in flat(from_run).items():
        np.testing.assert_array_equal(flat(from_npz)[path], value, err_msg=path)


def test_upcycle_noise_sets_the_expert_copies_apart_by_the_stated_std(dense_run, tmp_path):
    source, _ = dense_run
    _, params = _upcycle(tmp_path / "noisy", source, *FROZEN, "finetune.upcycle_noise=0.1")
    dense = vmoe_train.restore_params(source / "checkpoints")["block_1"]["mlp"]["w_in"]
    experts = params["block_1"]["moe"]["experts"]["w_in"]
    noise = experts - dense[None]
    # Each copy's noise: std 0.1 x the dense array's std (stacked E times), independent per
    # expert.
    assert np.std(noise) == pytest.approx(0.1 * np.std(dense), rel=0.1)
    assert not np.allclose(noise[0], noise[1])


def test_init_rules_copy_what_they_name_and_keep_the_rest_fresh(dense_run, tmp_path):
    source, _ = dense_run
    dense = vmoe_train.restore_params(source / "checkpoints")
    rules = "(('block_1/mlp/(.+)', r'block_1/moe/experts/\\1', 'tile'), ('(.+)', r'\\1'))"
    config = tiny_config(
        [
            f"finetune.init_from={source}",
            f"finetune.init_rules={rules}",
            "finetune.keep_fresh=block_1/moe/router/.*|head/.*",
            *FROZEN,
        ]
    )
    vmoe_train.train(config, tmp_path / "rules")
    params = vmoe_train.restore_params(tmp_path / "rules" / "checkpoints")
    np.testing.assert_array_equal(params["embedding"]["kernel"], dense["embedding"]["kernel"])
    np.testing.assert_array_equal(
        params["block_1"]["moe"]["experts"]["w_out"][3], dense["block_1"]["mlp"]["w_out"]
    )
    # finetune.new_head (default True): the head starts fresh (zeros), not the dense run's.
    assert not np.array_equal(params["head"]["kernel"], dense["head"]["kernel"])


def test_rules_that_do_not_fit_name_every_problem_before_training(dense_run, tmp_path):
    source, _ = dense_run
    rules = "(('block_0/.*', '', 'drop'), ('(.+)', r'\\1'))"  # block_1's MLP has no target
    config = tiny_config([f"finetune.init_from={source}", f"finetune.init_rules={rules}"])
    with pytest.raises(vmoe_train.InitRulesError) as caught:
        vmoe_train.train(config, tmp_path / "bad")
    text = str(caught.value)
    assert "source block_1/mlp/w_in" in text and "target block_0/mlp/w_in" in text
    assert "target block_1/moe/router/gate" in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.upcycle=True"], "finetune.upcycle=True: needs finetune.init_from"),
        (["finetune.init_from=x.npz"], "finetune.init_from='x.npz': names a .npz file that"),
        (["finetune.init_rules=(('a',),)"], "finetune.init_rules=(('a',),): rule 0 is ('a',)"),
        (["finetune.unmatched=keep"], "finetune.unmatched='keep': unknown unmatched policy"),
        (["finetune.keep_fresh=("], "finetune.keep_fresh='(': is not a valid regular exp"),
        (["finetune.upcycle_noise=-1.0"], "finetune.upcycle_noise=-1.0: must be >= 0"),
        (
            ["finetune.upcycle=True", "finetune.init_rules=(('(.+)', '\\1'),)"],
            "finetune.upcycle=True: takes its own rules: leave finetune.init_rules empty",
        ),
    ],
)
def test_bad_upcycling_settings_are_config_errors(overrides, message, tmp_path):
    with pytest.raises(vmoe_train.ConfigError, match=re.escape(message)):
        vmoe_train.check_config(tiny_config(overrides))
