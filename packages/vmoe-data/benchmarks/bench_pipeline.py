"""Images/s of the vmoe-data train pipeline: on the embedded digits and on synthetic 224x224.

    python packages/vmoe-data/benchmarks/bench_pipeline.py [--seconds S] [--workers 0 2]

Needs only vmoe-data (and what it depends on). Prints one line per configuration, worker count
and way of making batches: `cache=None` (the default: vectorised where the split fits in memory
and the ops allow) and `cache=False` (per example), with microseconds of this process's CPU per
image (its worker processes' CPU is not counted) and the ratio of the two. Whether the pipeline
keeps up with training is a question across packages, answered by
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
from vmoe_data.cache import in_memory

CONFIGS = [
    # (label, dataset, dataset options, pp spec, batch size)
    ("digits 8x8", "digits", {}, "decode|value_range(-1, 1)|onehot(10)", 256),
    (
        "digits_vmoe train spec",  # vmoe-train's digits_vmoe config: pp.train, batch_size
        "digits",
        {},
        "decode|inception_crop(8, 70)|value_range(-1, 1)|onehot(10)",
        64,
    ),
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


def images_per_second(pipeline, batch_size: int, seconds: float) -> tuple[float, float, int]:
    """Reads batches for about `seconds` (after 2 warm-up batches): (images/s, CPU us per image
    in this process, batches)."""
    iterator = iter(pipeline)
    for _ in range(2):
        next(iterator)
    start, cpu, batches = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - start < seconds:
        batch = next(iterator)
        assert batch["image"].shape[0] == batch_size
        batches += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if hasattr(iterator, "close"):
        iterator.close()
    images = batches * batch_size
    return images / elapsed, cpu / images * 1e6, batches


CACHES = {None: "cache=None", False: "cache=False"}


def measure(seconds: float, workers: list[int]) -> dict[tuple[str, int, bool | None], float]:
    """Images/s of every CONFIGS pipeline with each worker count and cache setting (keys:
    (label, workers, cache)), printed as measured."""
    data_dir = vmoe_data.default_data_dir()
    print(f"vmoe-data {vmoe_data.__version__}, {os.cpu_count()} CPUs, data dir {data_dir}")
    vmoe_data.get_dataset("digits")  # build once, outside the timings
    results = {}
    for label, name, options, pp, batch_size in CONFIGS:
        dataset = vmoe_data.get_dataset(name, **options)
        vectorised = vmoe_data.preprocess(pp).vectorizable and (
            in_memory(dataset.source("train"), None) is not None
        )
        for num_workers in workers:
            cpu = {}
            for cache, shown in CACHES.items():
                pipeline = vmoe_data.train_pipeline(
                    dataset,
                    batch_size=batch_size,
                    pp=pp,
                    num_workers=num_workers,
                    seed=0,
                    cache=cache,
                )
                rate, cpu[cache], batches = images_per_second(pipeline, batch_size, seconds)
                results[(label, num_workers, cache)] = rate
                path = "vectorised" if vectorised and cache is None else "per example"
                print(
                    f"{label:24s} batch {batch_size:4d} workers {num_workers} {shown:11s} "
                    f"({path:11s}): {rate:9.0f} images/s, {cpu[cache]:7.1f} us CPU/image "
                    f"({batches} batches)"
                )
            if vectorised and not num_workers:
                print(
                    f"  {label}: CPU per image, cache=False / cache=None: "
                    f"{cpu[False] / cpu[None]:.1f}x"
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
