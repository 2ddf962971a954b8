"""Is the vmoe-data input pipeline faster than training? Pipeline images/s vs measured steps.

    python benchmarks/bench_data.py [--seconds S] [--workers 0 2]

Runs vmoe-data's own pipeline benchmark (packages/vmoe-data/benchmarks/bench_pipeline.py: the
embedded digits and synthetic 224x224 images, 0 and 2 worker processes), then times a real
jitted train step (forward, backward, SGD update; training mode with gating noise) of the model
each pipeline feeds, on this machine: V-MoE-Mu/2 on 8x8 digits (the default setup) fed by
`digits 8x8`, and V-MoE-S/32 at 224x224 fed by the synthetic pipeline, at that pipeline's batch
size. Exits 1 when a pipeline is not faster than its model's training: the input pipeline must
not be the bottleneck. Uses vmoe-data and vmoe-layers (`nox -s bench-data`).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

import vmoe_layers

PIPELINE = (
    pathlib.Path(__file__).resolve().parents[1]
    / "packages"
    / "vmoe-data"
    / "benchmarks"
    / "bench_pipeline.py"
)

# (label, the pipeline configuration feeding it, model preset, image shape).
MODELS = [
    ("V-MoE-Mu/2 on digits 8x8 (the default setup)", "digits 8x8", "V-MoE-Mu/2", (8, 8, 1)),
    ("V-MoE-S/32 at 224x224", "synthetic 224x224 + aug", "V-MoE-S/32", (224, 224, 3)),
]


def _load_pipeline_benchmark():
    spec = importlib.util.spec_from_file_location("bench_pipeline", PIPELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_images_per_second(model_name: str, image_shape, batch_size: int) -> float:
    """Measured images/s of a real jitted train step (forward, backward, SGD update) of the
    vmoe_layers preset on this machine."""
    model = vmoe_layers.create_model(model_name, num_classes=10)
    images = jnp.zeros((batch_size, *image_shape), jnp.float32)
    labels = jnp.zeros((batch_size,), jnp.int32)
    params = model.init(jax.random.key(0), images)["params"]
    rngs = {"gating": jax.random.key(1), "dropout": jax.random.key(2)}

    def loss(params):
        out = model.apply({"params": params}, images, train=True, rngs=rngs)
        logp = jax.nn.log_softmax(out.logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1)) + out.aux_loss

    @jax.jit
    def step(params):
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, jax.grad(loss)(params))

    params = jax.block_until_ready(step(params))  # compile
    start, steps = time.perf_counter(), 0
    while steps < 2 or time.perf_counter() - start < 2.0:
        params = jax.block_until_ready(step(params))
        steps += 1
    return steps * batch_size / (time.perf_counter() - start)


def main() -> int:
    pipelines = _load_pipeline_benchmark()
    parser = argparse.ArgumentParser(description=__doc__)
    pipelines.add_arguments(parser)
    args = parser.parse_args()
    results = pipelines.measure(args.seconds, args.workers)
    bottleneck = False
    for label, config, model_name, image_shape in MODELS:
        batch_size = next(b for (c, _, _, _, b) in pipelines.CONFIGS if c == config)
        train_rate = training_images_per_second(model_name, image_shape, batch_size)
        pipeline_rate = max(
            rate for (c, _, cache), rate in results.items() if c == config and cache is None
        )
        ratio = pipeline_rate / train_rate
        verdict = "not the bottleneck" if ratio > 1 else "THE BOTTLENECK"
        bottleneck |= ratio <= 1
        print(
            f"training {label}: {train_rate:8.0f} images/s measured; pipeline {config!r} "
            f"{pipeline_rate:8.0f}: {ratio:.1f}x -> the input pipeline is {verdict}"
        )
    return 1 if bottleneck else 0


if __name__ == "__main__":
    sys.exit(main())
