"""A run converted from an original V-MoE checkpoint loads like a trained one, same outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import vmoe_layers as vl
from vmoe_eval import load_run
from vmoe_train.config import load_config
from vmoe_train.original import convert, export_params, infer_architecture, read_checkpoint
from vmoe_train.setup import build_model


def test_load_run_reads_a_converted_run_and_computes_what_its_parameters_compute(tmp_path):
    model = vl.create_model("V-MoE-Nano/2", num_classes=10, representation_size=8)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(s.dtype), abstract)
    export_params(params, tmp_path / "original/ckpt")  # the original release's layout
    convert(tmp_path / "original/ckpt", tmp_path / "run", load_config("digits_vmoe"))

    run = load_run(tmp_path / "run")
    assert run.step == 0 and run.model.representation_size == 8
    assert run.model.moe.dispatch_dtype == "bfloat16" and run.model.moe.group_size == 8 * 17
    images = rng.standard_normal((8, 8, 8, 1)).astype(np.float32)
    # The model its config builds for the original files' architecture is the run's; one
    # compiled forward pass then runs it on the loaded and on the original parameters (placed
    # as load_run places them, so that it compiles once).
    arrays = read_checkpoint(tmp_path / "original/ckpt")
    arch = infer_architecture({path: a.shape for path, a in arrays.items()})
    exchange = run.setup.strategy.exchange  # the run's strategy's (each device routes its own)
    assert run.model == build_model(
        run.config, num_classes=arch.num_classes, group_size=8 * 17, exchange=exchange
    )
    apply = jax.jit(run.model.apply)
    logits = apply({"params": run.params}, images).logits
    expected = apply({"params": vl.shard_params(run.setup.strategy, params)}, images).logits
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
