"""Images/s of the vmoe-data train pipeline: on the embedded digits and on synthetic 224x224.

Run with `nox -s bench-data` (or `python bench_pipeline.py --help`). Prints one line per
configuration, then, for the default digits setup (a V-MoE-Mu/2) and a V-MoE-S/32 at 224x224,
how many images/s a real train step of that model runs at on this machine (vmoe-layers, a
benchmark-only dependency). Exits 1 when a pipeline is not faster than training: the pipeline
must not be the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import vmoe_data

CONFIGS = [
    # (label, dataset, dataset options, pp spec, batch size)
    ("digits 8x8", "digits", {}, "decode|value_range(-1, 1)|onehot(10)", 256),
    (
        "digits 8x8 -> 32x32 + aug",
        "digits",
        {},
        "decode|inception_crop(32)|flip_lr|value_range(-1, 1)|onehot(10)|mixup(0.2)",
        256,
    ),
    (
        "synthetic 224x224 + aug",
        "synthetic",
        {"image_size": 224, "num_classes": 1000},
        "decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(1000)",
        64,
    ),
]


def images_per_second(pipeline, batch_size: int, seconds: float) -> tuple[float, int]:
    """Reads batches for about `seconds` (after 2 warm-up batches): (images/s, batches)."""
    iterator = iter(pipeline)
    for _ in range(2):
        next(iterator)
    start, batches = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        batch = next(iterator)
        assert batch["image"].shape[0] == batch_size
        batches += 1
    elapsed = time.perf_counter() - start
    if hasattr(iterator, "close"):
        iterator.close()
    return batches * batch_size / elapsed, batches


# (label, the CONFIGS pipeline feeding it, model preset, image shape).
MODELS = [
    ("V-MoE-Mu/2 on digits 8x8 (the default setup)", "digits 8x8", "V-MoE-Mu/2", (8, 8, 1)),
    ("V-MoE-S/32 at 224x224", "synthetic 224x224 + aug", "V-MoE-S/32", (224, 224, 3)),
]


def training_images_per_second(model_name: str, image_shape, batch_size: int) -> float:
    """Measured images/s of a real jitted train step (forward, backward, SGD update) of the
    vmoe_layers preset on this machine. (vmoe-layers is a benchmark-only dependency.)"""
    import jax
    import jax.numpy as jnp

    import vmoe_layers

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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per config")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="num_workers")
    args = parser.parse_args()
    data_dir = vmoe_data.default_data_dir()
    print(f"vmoe-data {vmoe_data.__version__}, {os.cpu_count()} CPUs, data dir {data_dir}")
    vmoe_data.get_dataset("digits")  # build once, outside the timings
    results = {}
    for label, name, options, pp, batch_size in CONFIGS:
        dataset = vmoe_data.get_dataset(name, **options)
        for workers in args.workers:
            pipeline = vmoe_data.train_pipeline(
                dataset, batch_size=batch_size, pp=pp, num_workers=workers, seed=0
            )
            rate, batches = images_per_second(pipeline, batch_size, args.seconds)
            results[(label, name, workers)] = rate
            print(
                f"{label:28s} batch {batch_size:4d} workers {workers}: "
                f"{rate:10.0f} images/s ({batches} batches)"
            )
    np.testing.assert_array_less(0, list(results.values()))
    bottleneck = False
    for label, config, model_name, image_shape in MODELS:
        batch_size = next(b for (c, _, _, _, b) in CONFIGS if c == config)
        train_rate = training_images_per_second(model_name, image_shape, batch_size)
        pipeline_rate = max(rate for (c, _, _), rate in results.items() if c == config)
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
