"""Resume's peak memory vs training's: does a model that trains also resume?

    python benchmarks/bench_resume_memory.py [--model V-MoE-S/32] [--experts 8]
                                             [--json bench-results/resume_memory.json]

Each phase is its own process (peak resident memory, `ru_maxrss`, is per process), all on the
embedded digits resized to 32x32 (a V-MoE-S/32: 84.6 M parameters with 8 experts, so the train
state, parameters + AdamW's two moments, is about 1 GB and dominates memory):

- train: `vmoe_train.train` for 2 steps from scratch, checkpoint at the end: the peak of
  initialising and training (state, gradients, the step's temporaries).
- resume: `trainer.initial_state` on that checkpoint (what `train` does to resume: the config
  check, then a restore into `steps.abstract_train_state`, shapes and shardings only), then
  one train step: the peak right after restoring, and after the step.
- resume-fresh-state: the previous way (before issue 20): a fresh `create_train_state`, then a
  restore laid out like it, both alive together.

Prints the table and writes JSON; exits 1 if resume's peak after restoring is above train's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile

PHASES = ("train", "resume", "resume-fresh-state")


def _config(model: str, experts: int, num_steps: int):
    import vmoe_train

    config = vmoe_train.load_config("digits_vmoe")
    return vmoe_train.apply_overrides(
        config,
        [
            f"model.name={model}",
            f"model.moe.num_experts={experts}",
            "model.moe.group_images=1",
            "pp.train=decode|resize(32)|value_range(-1, 1)|onehot(10)",
            "pp.eval=decode|resize(32)|value_range(-1, 1)",
            "batch_size=8",
            "eval_batch_size=8",
            f"num_steps={num_steps}",
            "optimizer.warmup_steps=0",
            "eval.every_steps=0",
            "checkpoint.every_steps=0",
            "checkpoint.async_save=False",
            "dataset.eval_splits=()",
            "dataset.test_split=",
            "log.callbacks=()",
        ],
    )


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _state_mb(state) -> float:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20


def run_phase(phase: str, workdir: pathlib.Path, model: str, experts: int) -> dict:
    import jax

    import vmoe_data
    from vmoe_train import checkpoints, setup, steps, trainer

    if phase == "train":
        trainer.train(_config(model, experts, 2), workdir)
        return {"peak_mb": _peak_mb()}
    config = _config(model, experts, 3)
    config.resume.allow_changes = ("num_steps",)
    built = setup.build(config)
    ckpt = checkpoints.Checkpointer(workdir / "checkpoints", every_steps=0, keep=0)
    if phase == "resume":
        state, _, step, _ = trainer.initial_state(built, ckpt)
    else:
        fresh = steps.create_train_state(
            built.model, built.optimizer, config.seed, built.sample_images, built.strategy
        )
        restored = ckpt.restore(checkpoints.abstract_like(fresh))
        state, step = restored.state, restored.step
        jax.block_until_ready(state)
        out = {"peak_after_restore_mb": _peak_mb(), "state_mb": _state_mb(state), "step": step}
        del fresh
        ckpt.close()
        return out
    jax.block_until_ready(state)
    out = {"peak_after_restore_mb": _peak_mb(), "state_mb": _state_mb(state), "step": step}
    batches = iter(
        vmoe_data.train_pipeline(
            built.dataset, split="train", batch_size=8, pp=config.pp.train, seed=0
        )
    )
    state, metrics = built.train_step(state, built.to_global(next(batches)))
    jax.block_until_ready(metrics)
    out["peak_after_step_mb"] = _peak_mb()
    ckpt.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="V-MoE-S/32")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--json", default="bench-results/resume_memory.json")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:  # a child process: one phase, its figures as the last line
        result = run_phase(args.phase, pathlib.Path(args.workdir), args.model, args.experts)
        print(json.dumps(result))
        return 0

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp) / "run"
        for phase in PHASES:
            command = [sys.executable, __file__, "--phase", phase, "--workdir", str(workdir)]
            command += ["--model", args.model, "--experts", str(args.experts)]
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode:
                sys.stderr.write(done.stderr[-5000:])
                return 2
            results[phase] = json.loads(done.stdout.strip().splitlines()[-1])
    train = results["train"]["peak_mb"]
    resume = results["resume"]["peak_after_restore_mb"]
    rows = [
        ("train: init + 2 steps + save", train),
        ("resume: restore into abstract state", resume),
        ("resume, then one train step", results["resume"]["peak_after_step_mb"]),
        ("before: fresh state + restore", results["resume-fresh-state"]["peak_after_restore_mb"]),
    ]
    state_mb = results["resume"]["state_mb"]
    print(f"{args.model}, {args.experts} experts; train state {state_mb:.0f} MB")
    print(f"{'phase (own process)':<40} {'peak RSS MB':>12} {'/ train':>8}")
    for label, mb in rows:
        print(f"{label:<40} {mb:>12.0f} {mb / train:>8.2f}")
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "experts": args.experts, **results}, indent=2))
    return 0 if resume <= train else 1


if __name__ == "__main__":
    sys.exit(main())
