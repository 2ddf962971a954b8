"""Images/s of the vmoe-data train pipeline: on the embedded digits and on synthetic 224x224.

Run with `nox -s bench-data` (or `python bench_pipeline.py --help`). Prints one line per
configuration, then an estimate of how many images/s this machine could *train* on, so the two
can be compared: the pipeline must not be the bottleneck.
"""

from __future__ import annotations

import argparse
import os
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


def training_estimate() -> float:
    """Images/s this machine could train a V-MoE S/32 at 224x224 on, from its matmul speed.

    The model's dense cost (8 blocks, D=512, MLP 2048, 50 tokens; an MoE block with K=2
    costs about two MLPs) times 3 (forward + backward), over the measured jitted matmul FLOP/s:
    an upper bound on training throughput (attention softmax, norms and routing are ignored).
    """
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 512), jnp.float32)
    b = jnp.ones((512, 2048), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        matmul(a, b).block_until_ready()
        n += 1
    flops_per_s = n * 2 * 2048 * 512 * 2048 / (time.perf_counter() - start)
    tokens, d, mlp, layers = 50, 512, 2048, 8
    per_layer = 2 * tokens * (4 * d * d) + 2 * 2 * tokens * tokens * d
    per_layer_mlp = 2 * tokens * 2 * d * mlp
    mlp_cost = (layers // 2) * per_layer_mlp + (layers // 2) * 2 * per_layer_mlp  # 4 MoE, K=2
    flops_per_image = 3 * (layers * per_layer + mlp_cost)
    return flops_per_s / flops_per_image


def main() -> None:
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
            results[(label, workers)] = rate
            print(
                f"{label:28s} batch {batch_size:4d} workers {workers}: "
                f"{rate:10.0f} images/s ({batches} batches)"
            )
    train_rate = training_estimate()
    print(
        f"{'training estimate':28s} V-MoE S/32 224x224 on this CPU: <= {train_rate:10.1f} images/s"
    )
    synthetic = max(v for (label, _), v in results.items() if label.startswith("synthetic"))
    ratio = synthetic / train_rate
    verdict = "not the bottleneck" if ratio > 1 else "THE BOTTLENECK"
    print(f"pipeline / training at 224x224: {ratio:.1f}x -> the input pipeline is {verdict}")
    np.testing.assert_array_less(0, list(results.values()))


if __name__ == "__main__":
    main()
