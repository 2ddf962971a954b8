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


def flaky_reads() -> None:
    """A storage layer that fails the first read of each checkpoint step (an I/O error, as a
    network file system's hiccup), in this process: orbax's readers raise OSError(EIO) once per
    step directory, then read normally. The trainer must retry, not skip or delete."""
    import errno

    import orbax.checkpoint as ocp

    from vmoe_train.checkpoints import reading

    reading.RETRY_DELAYS_S = (0.05, 0.1)
    failed: set[str] = set()

    def once(key: str) -> None:
        if key not in failed:
            failed.add(key)
            print(f"flaky storage: EIO reading {key}", file=sys.stderr, flush=True)
            raise OSError(errno.EIO, "Input/output error (injected)", key)

    manager_restore = ocp.CheckpointManager.restore
    checkpointer_restore = ocp.Checkpointer.restore

    def restore_step(self, step, *args, **kwargs):
        once(f"{self.directory}/{step}")
        return manager_restore(self, step, *args, **kwargs)

    def restore_path(self, directory, *args, **kwargs):
        once(str(directory))
        return checkpointer_restore(self, directory, *args, **kwargs)

    ocp.CheckpointManager.restore = restore_step
    ocp.Checkpointer.restore = restore_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-at-checkpoint", type=int)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument(
        "--flaky-reads",
        action="store_true",
        help="the first read of every checkpoint (state or JSON item) fails with EIO",
    )
    args = parser.parse_args(argv)
    if args.flaky_reads:
        flaky_reads()
    config = tiny_config(args.set)
    vmoe_train.train(
        config, args.workdir, callbacks=[Kill(args.kill_at_step, args.kill_at_checkpoint)]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
