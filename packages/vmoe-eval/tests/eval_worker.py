"""Evaluates a checkpoint in one of several processes (jax.distributed on 127.0.0.1, gloo CPU
collectives), for the tests; also holds the tiny training config they share.

    python eval_worker.py CHECKPOINT OUT.json --batch-size B \
        [--coordinator 127.0.0.1:PORT --num-processes P --process-id I]

Writes {"process": I, "results": accuracy evaluator's results, "ids": the ids of the real
examples of the test split that `loading.forward` served, in order}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def tiny_config(overrides=()):
    """vmoe-train's tests' tiny V-MoE (V-MoE-Nano/4, 2 blocks of width 32, 4 experts, routing
    groups of 2 images) on the embedded digits, without periodic evaluation or logs."""
    import vmoe_train

    config = vmoe_train.load_config("digits_vmoe")
    config.model.name = "V-MoE-Nano/4"
    config.model.moe.group_images = 2
    config.pp.train = "decode|inception_crop(8, 70)|value_range(-1, 1)|onehot(10)"
    config.batch_size = 16
    config.optimizer.learning_rate = 5e-3
    config.eval_batch_size = 64
    config.num_steps = 24
    config.optimizer.warmup_steps = 4
    config.log.every_steps = 10
    config.log.callbacks = ()
    config.eval.every_steps = 0
    config.checkpoint.every_steps = 0
    config.checkpoint.keep = 10
    config.dataset.eval_splits = ("validation",)
    return vmoe_train.apply_overrides(config, list(overrides))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--coordinator", default="")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    import numpy as np

    from vmoe_eval import evaluators, loading

    run = loading.load_run(args.checkpoint)
    evaluator = evaluators.get_evaluator("accuracy", split="test", batch_size=args.batch_size)
    results = evaluator.evaluate(run)
    ids = []
    for _, batch in loading.forward(run, "test", batch_size=args.batch_size):
        ids += np.asarray(batch["id"])[np.asarray(batch["mask"], bool)].tolist()
    record = {"process": jax.process_index(), "results": results, "ids": ids}
    pathlib.Path(args.out).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
