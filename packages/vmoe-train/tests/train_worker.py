"""Runs a tiny training job for the tests, optionally killing itself (SIGKILL) at a step.

    python train_worker.py WORKDIR [--kill-at-step N] [--kill-at-checkpoint N] [--set k=v ...]

Killing at a checkpoint happens right after the (asynchronous) save of that step began, i.e.
while orbax is still writing it. Also used with jax.distributed (--set distributed...=...).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import vmoe_train
from vmoe_train.callbacks import Callback


def tiny_config(overrides=()):
    config = vmoe_train.load_config("digits_vmoe")
    config.model.name = "V-MoE-Nano/4"  # 2 blocks of width 32, 4 experts: a fast real V-MoE
    config.model.moe.group_images = 2
    config.pp.train = "decode|inception_crop(8, 70)|value_range(-1, 1)|onehot(10)"
    config.batch_size = 16
    config.optimizer.learning_rate = 5e-3
    config.eval_batch_size = 64
    config.num_steps = 24
    config.optimizer.warmup_steps = 4
    config.log.every_steps = 2
    config.log.callbacks = ("jsonl",)
    config.eval.every_steps = 0
    config.checkpoint.every_steps = 4
    config.checkpoint.keep = 10
    config.dataset.eval_splits = ("validation",)
    return vmoe_train.apply_overrides(config, list(overrides))


class Kill(Callback):
    def __init__(self, at_step: int | None, at_checkpoint: int | None):
        self.at_step, self.at_checkpoint = at_step, at_checkpoint

    def on_step_end(self, step, metrics):
        if step == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint(self, step, path):
        if step == self.at_checkpoint:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-at-checkpoint", type=int)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    config = tiny_config(args.set)
    vmoe_train.train(
        config, args.workdir, callbacks=[Kill(args.kill_at_step, args.kill_at_checkpoint)]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
