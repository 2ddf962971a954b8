"""Evaluation speed: vmoe-eval's accuracy evaluator against the train step's forward pass.

    python benchmarks/bench_eval.py [--repeats 5] [--split train] [--json bench-results/eval.json]

On the digits V-MoE (the `digits_vmoe` config's model, parameters from its initialisation: speed
does not depend on training), in the same run and in turns (so every ratio sees one machine
load), images per second of:

- `evaluator`: `vmoe_eval.get_evaluator("accuracy", split=...).evaluate(run)`: the eval data
  pipeline (decode, preprocess, pad and mask the last batch), the jitted eval-mode forward,
  top-1 and the masked counts: what `vmoe-eval accuracy` and the trainer's evaluation do;
- `eval pipeline`: the eval data pipeline alone (reading and preprocessing, no model);
- `eval forward`: the same jitted eval-mode forward over the same batches already in memory;
- `train forward`: the train step's forward pass (train=True: gating noise, dropout, training
  capacity) over the same batches in memory, no gradient.

The evaluator compiles once (then every batch reuses it); compile time is excluded.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import numpy as np

import vmoe_data
import vmoe_eval
import vmoe_layers as vl
import vmoe_train
from vmoe_train import setup as setup_lib


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--split", default="train", help="digits split (train: 1,253 images)")
    parser.add_argument("--json", default="bench-results/eval.json")
    args = parser.parse_args(argv)

    config = vmoe_train.load_config("digits_vmoe")
    setup = setup_lib.build(config)
    state = vmoe_train.create_train_state(
        setup.model, setup.optimizer, config.seed, setup.sample_images, setup.strategy
    )
    run = vmoe_eval.LoadedRun(pathlib.Path("."), 0, config, setup, state.params, state.router_state)
    evaluator = vmoe_eval.get_evaluator("accuracy", split=args.split)

    batches = [
        setup.to_global(b)
        for b in vmoe_data.eval_pipeline(
            setup.dataset, split=args.split, batch_size=config.eval_batch_size, pp=config.pp.eval
        )
    ]
    num_images = sum(int(np.sum(b["mask"])) for b in batches)
    model = setup.model
    eval_forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    rngs = {vl.GATING_RNG: jax.random.key(1), "dropout": jax.random.key(2)}
    train_forward = jax.jit(
        lambda p, x: model.apply({"params": p}, x, train=True, rngs=rngs).logits
    )

    def over_batches(fn):
        def go():
            for b in batches:
                out = fn(state.params, b["image"])
            jax.block_until_ready(out)

        return go

    def pipeline_only():
        for _ in vmoe_data.eval_pipeline(
            setup.dataset, split=args.split, batch_size=config.eval_batch_size, pp=config.pp.eval
        ):
            pass

    loops = {
        "evaluator": lambda: evaluator.evaluate(run),
        "eval pipeline": pipeline_only,
        "eval forward": over_batches(eval_forward),
        "train forward": over_batches(train_forward),
    }
    for loop in loops.values():  # compile, fill caches
        loop()
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            start = time.perf_counter()
            loop()
            seconds[name].append(time.perf_counter() - start)

    rows = {name: num_images / statistics.median(s) for name, s in seconds.items()}
    report = {
        "config": "digits_vmoe",
        "model": config.model.name,
        "split": args.split,
        "images": num_images,
        "eval_batch_size": config.eval_batch_size,
        "repeats": args.repeats,
        "images_per_second": rows,
        "spread_seconds": {n: [min(s), max(s)] for n, s in seconds.items()},
        "evaluator_vs_train_forward": rows["evaluator"] / rows["train forward"],
        "eval_forward_vs_train_forward": rows["eval forward"] / rows["train forward"],
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
    }
    print(
        f"{config.model.name} on digits '{args.split}' ({num_images} images, batch "
        f"{config.eval_batch_size}), median of {args.repeats} runs in turns:"
    )
    print(f"{'loop':<16}{'images/s':>12}{'vs train forward':>20}")
    for name, value in rows.items():
        print(f"{name:<16}{value:>12.0f}{value / rows['train forward']:>19.2f}x")
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
