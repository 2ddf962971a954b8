"""Images/s of the vmoe-data train pipeline: on the embedded digits and on synthetic 224x224.

Run with `nox -s bench-data` (or `python bench_pipeline.py --help`). Prints one line per
configuration, then, for the default digits setup (a V-MoE-Mu/2) and a V-MoE-S/32 at 224x224,
an upper bound on how many images/s this machine could *train* on. Exits 1 when a pipeline is
not faster than that bound: the pipeline must not be the bottleneck.
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


# (label, the CONFIGS pipeline feeding it, tokens, D, MLP, layers); MoE on every other block
# with K=2 (an MoE block costs about two MLPs). See vmoe_layers.presets.
MODELS = [
    ("V-MoE-Mu/2 on digits 8x8 (the default setup)", "digits 8x8", 17, 64, 128, 4),
    ("V-MoE-S/32 at 224x224", "synthetic 224x224 + aug", 50, 512, 2048, 8),
]


def matmul_flops_per_second(m: int, k: int, n: int) -> float:
    """This machine's jitted float32 matmul speed at [m, k] @ [k, n], FLOP/s (a model's MLP
    shapes: m = batch x tokens; small matmuls run well below the machine's peak)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        matmul(a, b).block_until_ready()
        count += 1
    return count * 2 * m * k * n / (time.perf_counter() - start)


def training_estimate(flops_per_s: float, tokens: int, d: int, mlp: int, layers: int) -> float:
    """Images/s this machine could train a V-MoE on, at most: the model's dense FLOPs times 3
    (forward + backward) over the matmul speed measured at its MLP shapes. An upper bound
    (attention softmax, norms, routing and dispatch are ignored), so a pipeline faster than it
    is certainly not the bottleneck."""
    per_layer = 2 * tokens * (4 * d * d) + 2 * 2 * tokens * tokens * d
    per_layer_mlp = 2 * tokens * 2 * d * mlp
    mlp_cost = (layers // 2) * per_layer_mlp + (layers // 2) * 2 * per_layer_mlp  # K=2
    return flops_per_s / (3 * (layers * per_layer + mlp_cost))


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
    for label, config, tokens, d, mlp, layers in MODELS:
        batch_size = next(b for (c, _, _, _, b) in CONFIGS if c == config)
        flops_per_s = matmul_flops_per_second(batch_size * tokens, d, mlp)
        train_rate = training_estimate(flops_per_s, tokens, d, mlp, layers)
        pipeline_rate = max(rate for (c, _, _), rate in results.items() if c == config)
        ratio = pipeline_rate / train_rate
        verdict = "not the bottleneck" if ratio > 1 else "THE BOTTLENECK"
        bottleneck |= ratio <= 1
        print(
            f"training {label}: <= {train_rate:8.0f} images/s; pipeline {config!r} "
            f"{pipeline_rate:8.0f}: {ratio:.1f}x -> the input pipeline is {verdict}"
        )
    return 1 if bottleneck else 0


if __name__ == "__main__":
    sys.exit(main())
