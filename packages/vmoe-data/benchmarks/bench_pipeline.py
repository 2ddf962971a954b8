"""Images/s of the vmoe-data train pipeline: on the embedded digits and on synthetic 224x224.

    python packages/vmoe-data/benchmarks/bench_pipeline.py [--seconds S] [--workers 0 2]

Needs only vmoe-data (and what it depends on). Prints one line per configuration and worker
count. Whether the pipeline keeps up with training is a question across packages, answered by
the repository's `benchmarks/bench_data.py` (`nox -s bench-data`), which runs these
configurations next to measured train steps.
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


def measure(seconds: float, workers: list[int]) -> dict[tuple[str, int], float]:
    """Images/s of every CONFIGS pipeline with each worker count, printed as measured."""
    data_dir = vmoe_data.default_data_dir()
    print(f"vmoe-data {vmoe_data.__version__}, {os.cpu_count()} CPUs, data dir {data_dir}")
    vmoe_data.get_dataset("digits")  # build once, outside the timings
    results = {}
    for label, name, options, pp, batch_size in CONFIGS:
        dataset = vmoe_data.get_dataset(name, **options)
        for num_workers in workers:
            pipeline = vmoe_data.train_pipeline(
                dataset, batch_size=batch_size, pp=pp, num_workers=num_workers, seed=0
            )
            rate, batches = images_per_second(pipeline, batch_size, seconds)
            results[(label, num_workers)] = rate
            print(
                f"{label:28s} batch {batch_size:4d} workers {num_workers}: "
                f"{rate:10.0f} images/s ({batches} batches)"
            )
    np.testing.assert_array_less(0, list(results.values()))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per config")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="num_workers")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    args = parser.parse_args()
    measure(args.seconds, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
