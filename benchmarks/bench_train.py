"""The trainer's overhead: `vmoe_train.train` images/s vs a bare jitted train-step loop.

    python benchmarks/bench_train.py [--steps 600] [--repeats 3] [--warmup 50]
                                     [--checkpoint-every 200] [--max-overhead 5] [--no-fail]
                                     [--json bench-results/train.json]

Every loop trains the shipped `digits_vmoe` config (V-MoE-Mu/2 on the embedded digits, batch
64) for `--steps` steps with the same model, optimizer, jitted train step (`setup.build`),
initial state and batches (the train pipeline with the config's seed and pp):

- trainer: `vmoe_train.train(config, workdir)` in a fresh workdir, with its normal callbacks
  (progress bar, metrics.jsonl, TensorBoard), metrics fetched every `log.every_steps`, async
  checkpoints every `--checkpoint-every` steps, the input pipeline read step by step. No
  evaluation, periodic or final (evaluation is not training overhead). A callback times the loop
  from its first logged step at or after `--warmup` (compilation excluded) to the last step's
  log (the final checkpoint excluded).
- trainer-mem: the same `train` call with its input pipeline swapped for the same batches
  already read into host memory (a resumable iterator over a list): everything the trainer does
  but reading data. 1 - trainer / trainer-mem is the input pipeline's share of the overhead,
  1 - trainer-mem / bare the rest (metrics, callbacks, checkpoints, `Setup.to_global`).
- bare: the jitted step alone over the batches, put on the device before timing; timed from
  the same step, `block_until_ready` at both ends and on the loss every `log.every_steps` steps
  (as often as the trainer fetches its metrics: both loops let XLA run as far ahead). The
  reference.

The loops run in turns (the order reversed every other repeat) so that a ratio sees one machine
load; each also records this process's CPU time per step (all threads: XLA's, the pipeline's,
orbax's). Reports images/s of each repeat, the median ratio trainer / bare and the overhead
(1 - ratio) * 100%; exits 1 when the median overhead is over `--max-overhead` percent (unless
`--no-fail`). The loops end at the same loss when they trained on the same batches from the same
state (`same_final_loss` in the JSON).

Untimed, once, before the repeats: the bare step trains one step and saves a checkpoint (the
first save of a process compiles the checkpoint checksums). Each `train` call builds and
compiles its step again; a persistent jax compilation cache in a temporary directory (this
process only) makes every compilation after the first a cache read (the bare loop's too: its
step is built again after the warm-up). Uses vmoe-train and its
dependencies (`nox -s bench-train`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import pathlib
import statistics
import sys
import tempfile
import time

import vmoe_train as vt

# Before jax computes anything, as the `vmoe-train` command does on CPU hosts.
MALLOC_TUNED = vt.tune_cpu_malloc()

import jax  # noqa: E402
from harness import print_table, write_json  # noqa: E402

import vmoe_data  # noqa: E402
from vmoe_train import setup as setup_lib  # noqa: E402
from vmoe_train import steps as steps_lib  # noqa: E402

LOOPS = ("trainer", "trainer-mem", "bare")


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _result(steps: int, batch_size: int, start: tuple, end: tuple, **extra) -> dict:
    seconds, cpu = end[0] - start[0], end[1] - start[1]
    return {
        "timed_steps": steps,
        "seconds": seconds,
        "images_per_second": steps * batch_size / seconds,
        "cpu_ms_per_step": cpu / steps * 1e3,
        **extra,
    }


class LoopTimer(vt.Callback):
    """Times the training loop: its start, the first logged step at or after `warmup`, and the
    last step's log (`on_step_end` of `num_steps`); wall and process CPU time."""

    def __init__(self, warmup: int, num_steps: int) -> None:
        self.warmup, self.num_steps = warmup, num_steps
        self.train_start: tuple | None = None
        self.start: tuple | None = None
        self.start_step: int | None = None
        self.end: tuple | None = None
        self.final_loss: float | None = None

    def on_train_start(self, run: vt.RunInfo) -> None:
        self.train_start = _clocks()

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        now = _clocks()
        if self.start is None and step >= self.warmup:
            self.start, self.start_step = now, step
        if step == self.num_steps:
            self.end = now
            self.final_loss = metrics.get("train/loss")


def make_config(steps: int, checkpoint_every: int):
    config = vt.load_config("digits_vmoe")
    config.num_steps = steps
    # The schedule's warmup must fit in the run (short runs: --steps below 200).
    config.optimizer.warmup_steps = min(int(config.optimizer.warmup_steps), steps)
    # Evaluation is not training overhead: none during the loop, none at the end.
    config.eval.every_steps = 0
    config.dataset.eval_splits = ()
    config.dataset.test_split = ""
    config.checkpoint.every_steps = checkpoint_every
    config.checkpoint.async_save = True
    return config


class _InMemoryIterator:
    """The pipeline iterator's interface (`next`, `get_state`, `set_state`) over a list."""

    def __init__(self, batches: list) -> None:
        self.batches, self.position = batches, 0

    def __next__(self):
        batch = self.batches[self.position]
        self.position += 1
        return batch

    def get_state(self) -> dict:
        return {"batches": self.position}

    def set_state(self, state: dict) -> None:
        self.position = state["batches"]


class _InMemoryPipeline:
    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self) -> _InMemoryIterator:
        return _InMemoryIterator(self.batches)


@contextlib.contextmanager
def batches_in_memory(config, batches: list):
    """Inside the block, `vmoe_data.train_pipeline` (as the trainer calls it) gives `batches`,
    after checking that it is asked for the config's pipeline."""
    real = vmoe_data.train_pipeline

    def pipeline(dataset, *, split, batch_size, pp, seed, **options):
        asked = (split, batch_size, pp, seed)
        expected = (config.dataset.train_split, config.batch_size, config.pp.train, config.seed)
        assert asked == expected, (asked, expected)
        return _InMemoryPipeline(batches)

    vmoe_data.train_pipeline = pipeline
    try:
        yield
    finally:
        vmoe_data.train_pipeline = real


def run_trainer(config, warmup: int, in_memory: list | None = None) -> dict:
    """`train(config)` in a fresh workdir, timed by `LoopTimer`; with `in_memory`, its input
    pipeline is that list of batches."""
    num_steps = int(config.num_steps)
    timer = LoopTimer(warmup, num_steps)
    swap = contextlib.nullcontext() if in_memory is None else batches_in_memory(config, in_memory)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir, swap:
        vt.train(config, workdir, callbacks=[timer])
        saved = sorted(
            int(p.name)
            for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
            if p.name.isdigit()
        )
    if timer.start is None or timer.end is None or timer.start_step >= num_steps:
        raise SystemExit(
            f"no logged step in [{warmup}, {num_steps}) to time from "
            f"(log.every_steps={config.log.every_steps}): raise --steps or lower --warmup"
        )
    return _result(
        num_steps - timer.start_step,
        int(config.batch_size),
        timer.start,
        timer.end,
        from_step=timer.start_step,
        loop_seconds_incl_compile=timer.end[0] - timer.train_start[0],
        final_loss=timer.final_loss,
        checkpoints=saved,
    )


class BareLoop:
    """The trainer's jitted step over the same batches, put on the device before timing.

    `local_batches`: the first `num_steps` batches of the config's train pipeline as it gives
    them (host memory); `batches`: the same on the device (`Setup.to_global`)."""

    def __init__(self, config) -> None:
        self.config = config
        self.setup = setup_lib.build(config)
        pipeline = vmoe_data.train_pipeline(
            self.setup.dataset,
            split=config.dataset.train_split,
            batch_size=config.batch_size,
            pp=config.pp.train,
            seed=config.seed,
            num_workers=config.dataset.num_workers,
        )
        self.local_batches = list(itertools.islice(iter(pipeline), int(config.num_steps)))
        self.batches = jax.block_until_ready([self.setup.to_global(b) for b in self.local_batches])

    def fresh_state(self):
        setup = self.setup
        return steps_lib.create_train_state(
            setup.model, setup.optimizer, self.config.seed, setup.sample_images, setup.strategy
        )

    def warm_up(self) -> float:
        """Trains one step and saves the state once (public API, thrown away): compiles the
        train step, and the first save of a process compiles the checkpoint checksums and starts
        orbax's machinery, one-time costs that would otherwise land in the first trainer run's
        timed loop. Then builds the step again, so that the bare loop's executable, like every
        trainer run's, is read from the compilation cache. Returns its seconds."""
        start = time.perf_counter()
        # A state out of the train step, laid out as the trainer's are when it saves them.
        state, _ = self.setup.train_step(self.fresh_state(), self.batches[0])
        with (
            tempfile.TemporaryDirectory(prefix="bench-train-warmup-") as directory,
            vt.Checkpointer(directory, every_steps=0, keep=1) as checkpointer,
        ):
            checkpointer.save(1, state, data_state={}, config={}, force=True)
        self.setup = setup_lib.build(self.config)
        jax.block_until_ready(self.setup.train_step(self.fresh_state(), self.batches[0]))
        return time.perf_counter() - start

    def run(self, from_step: int) -> dict:
        setup, config = self.setup, self.config
        every = int(config.log.every_steps)
        state = self.fresh_state()
        batches = iter(self.batches)
        metrics = None
        for batch in itertools.islice(batches, from_step):
            state, metrics = setup.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        start = _clocks()
        for step, batch in enumerate(batches, start=from_step + 1):
            state, metrics = setup.train_step(state, batch)
            if step % every == 0:  # reads its loss as often as the trainer logs: the same syncs
                jax.block_until_ready(metrics["loss"])
        jax.block_until_ready((state, metrics))
        end = _clocks()
        return _result(
            len(self.batches) - from_step,
            int(config.batch_size),
            start,
            end,
            from_step=from_step,
            final_loss=float(metrics["loss"]),
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="train steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, in turns")
    parser.add_argument(
        "--warmup",
        type=int,
        default=50,
        help="steps not timed (compilation): timing starts at the first logged step at or after it",
    )
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--max-overhead", type=float, default=5.0, help="percent")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 whatever the overhead")
    parser.add_argument("--json", default="bench-results/train.json")
    args = parser.parse_args()

    config = make_config(args.steps, args.checkpoint_every)
    vt.check_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    # The trainer's first timed step: its first logged step (a multiple of `every`) at or after
    # the warmup.
    every = int(config.log.every_steps)
    from_step = max(1, -(-args.warmup // every)) * every
    if from_step >= args.steps:
        parser.error(
            f"no logged step in [{args.warmup}, {args.steps}) to time from (log every {every} "
            "steps): raise --steps or lower --warmup"
        )
    print(
        f"{config.model.name} on {config.dataset.name}, batch {config.batch_size}, "
        f"{args.steps} steps (timed from step {from_step}), log every {every}, checkpoints "
        f"every {args.checkpoint_every} (async), callbacks {list(config.log.callbacks)}; "
        f"tune_cpu_malloc: {MALLOC_TUNED}",
        flush=True,
    )
    cache = tempfile.TemporaryDirectory(prefix="bench-train-jax-cache-")
    jax.config.update("jax_compilation_cache_dir", cache.name)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    bare = BareLoop(config)
    warmup_seconds = bare.warm_up()
    print(f"untimed warm-up (compile the step, first checkpoint save): {warmup_seconds:.1f} s")
    rows = []
    for repeat in range(args.repeats):
        order = LOOPS if repeat % 2 == 0 else LOOPS[::-1]
        runs = {}
        for loop in order:
            if loop == "bare":
                runs[loop] = bare.run(from_step)
            else:
                in_memory = bare.local_batches if loop == "trainer-mem" else None
                runs[loop] = run_trainer(config, args.warmup, in_memory)
                assert runs[loop]["from_step"] == from_step, (runs[loop]["from_step"], from_step)
        rates = {loop: runs[loop]["images_per_second"] for loop in LOOPS}
        cpu = {loop: runs[loop]["cpu_ms_per_step"] for loop in LOOPS}
        ratio = rates["trainer"] / rates["bare"]
        rows.append(
            {
                "repeat": repeat + 1,
                "order": list(order),
                "trainer img/s": rates["trainer"],
                "trainer-mem img/s": rates["trainer-mem"],
                "bare img/s": rates["bare"],
                "trainer/bare": ratio,
                "overhead %": (1 - ratio) * 100,
                "data %": (1 - rates["trainer"] / rates["trainer-mem"]) * 100,
                "rest %": (1 - rates["trainer-mem"] / rates["bare"]) * 100,
                "cpu ms/step trainer": cpu["trainer"],
                "cpu ms/step trainer-mem": cpu["trainer-mem"],
                "cpu ms/step bare": cpu["bare"],
                **runs,
            }
        )
        print(
            f"repeat {repeat + 1} ({', '.join(order)}): "
            + ", ".join(
                f"{loop} {rates[loop]:.0f} img/s ({cpu[loop]:.1f} cpu ms/step)" for loop in LOOPS
            )
            + f"; overhead {(1 - ratio) * 100:.1f}%",
            flush=True,
        )
    cache.cleanup()

    ratio = statistics.median(r["trainer/bare"] for r in rows)
    overhead = (1 - ratio) * 100
    data_share = statistics.median(r["data %"] for r in rows)
    rest_share = statistics.median(r["rest %"] for r in rows)
    cpu_median = {loop: statistics.median(r[f"cpu ms/step {loop}"] for r in rows) for loop in LOOPS}
    same_loss = len({r[loop]["final_loss"] for r in rows for loop in LOOPS}) == 1
    print()
    columns = ["repeat", "trainer img/s", "trainer-mem img/s", "bare img/s", "trainer/bare"]
    columns += ["overhead %", "data %", "rest %"]
    columns += [f"cpu ms/step {loop}" for loop in LOOPS]
    print_table(rows, columns)
    overheads = [r["overhead %"] for r in rows]
    print(
        f"median trainer/bare {ratio:.3f}: overhead {overhead:.1f}% "
        f"(repeats {min(overheads):.1f}..{max(overheads):.1f}%, limit {args.max_overhead}%); "
        f"medians: input pipeline {data_share:.1f}%, the rest {rest_share:.1f}%; CPU ms/step "
        + ", ".join(f"{loop} {cpu_median[loop]:.1f}" for loop in LOOPS)
        + f"; same final loss: {same_loss}"
    )
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    write_json(
        args.json,
        {
            "config": "digits_vmoe",
            "model": config.model.name,
            "batch_size": int(config.batch_size),
            "steps": args.steps,
            "warmup": args.warmup,
            "timed_from_step": from_step,
            "log_every_steps": every,
            "checkpoint_every_steps": args.checkpoint_every,
            "callbacks": list(config.log.callbacks),
            "malloc_tuned": MALLOC_TUNED,
            "warmup_seconds": warmup_seconds,
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "repeats": rows,
            "median_ratio": ratio,
            "median_overhead_percent": overhead,
            "median_data_percent": data_share,
            "median_rest_percent": rest_share,
            "median_cpu_ms_per_step": cpu_median,
            "max_overhead_percent": args.max_overhead,
            "same_final_loss": same_loss,
            "ok": overhead <= args.max_overhead,
        },
    )
    if overhead > args.max_overhead:
        print(
            f"FAIL: the trainer's median overhead {overhead:.1f}% is over {args.max_overhead}% "
            f"(input pipeline read step by step: {data_share:.1f}%; metrics, callbacks, "
            f"checkpoints: {rest_share:.1f}%; medians over repeats)",
            file=sys.stderr,
        )
        return 0 if args.no_fail else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
