"""Callbacks: what the training loop tells the outside world, and the plugins that listen.

The loop calls, in order:

    on_train_start(run)                 once, after the state is built or restored
    on_step_end(step, metrics)          every `log.every_steps` steps (and at the last step)
    on_evaluate(step, variables, setup) at each periodic and the final evaluation, right after
                                        the trainer's own evaluation of `variables`
    on_eval(step, results)              then, with the trainer's evaluation results
    on_checkpoint(step, path)           after a checkpoint is written (or its async write begun)
    on_train_end(summary)               once, with the final results
    on_train_abort(error)               instead, if training raised (close what you opened)

At an evaluation step the order is on_step_end (when the step is logged), on_evaluate, on_eval,
on_checkpoint (when it is a checkpoint step); the final step's come after the loop, in the same
order. Periodic evaluations are at multiples of `eval.every_steps` (and, with
`checkpoint.keep_best`, at every checkpoint step); the final one is at `num_steps`.

`metrics` and `results` are flat dicts of Python floats keyed by "/"-separated names
("train/loss", "train/moe_block_1/no_expert_fraction", "validation/accuracy"). A callback
implements any subset (the others are no-ops through `Callback`'s defaults).

`on_evaluate` gives the model's variables to callbacks that evaluate more than the trainer
does (vmoe-eval's "evaluators" callback): `variables` are the trainer's live
`TrainState.variables()` at `step`, what `setup.model.apply` takes: {"params": ...}, and
{"router_state": ...} beside it where the routers keep state (global arrays laid out by
`setup.strategy`); `setup` the run's `vmoe_train.setup.Setup` (config, model, dataset,
strategy, `to_global`, `eval_batches`). They are valid only during the call: the next train
step donates their buffers, so use them there and keep nothing of them (copy to the host what
must outlive the call). Every process
calls it with its part of the same global arrays: collective work (a jitted forward, an
all-gather) is fine, as long as every process does the same.

Callbacks are plugins: the hook `vmoe_train_callbacks()` (vmoe_train.hookspecs) maps names to
factories `factory(run) -> Callback`; `config.log.callbacks` names the ones a run uses, and a
non-empty `config.eval.evaluators` adds "evaluators" (vmoe-eval's `EvalCallback`, which runs
them) where `log.callbacks` does not name it: `callback_names(config)`. Without vmoe-eval
installed, config validation reports `eval.evaluators` with the package to install.

Built-ins: "progress" (`ProgressBar`), "jsonl" (`JsonlLogger`, workdir/metrics.jsonl),
"tensorboard" (`TensorBoardLogger`, workdir/tensorboard/) and "profile" (`Profiler`,
workdir/profile/, steps from `config.log.profile_steps`; off without it).
`make_callbacks(names, run)` builds the named ones, `available_callbacks()` lists every installed
name. Only the main process writes.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

import tqdm

import vmoe_plugins
from vmoe_train.metric_writers import JsonlWriter, TensorBoardWriter

if TYPE_CHECKING:  # not at run time: setup imports config, which imports this module
    from vmoe_train.setup import Setup


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a callback may know about the run.

    Attributes:
      workdir: the run directory (checkpoints/, metrics.jsonl, TensorBoard events live here).
      config: the run's ConfigDict (read-only by convention).
      start_step: the step the loop starts from (0, or the restored step when resuming).
      num_steps: the step the loop ends at.
      is_main_process: True in process 0 (only it writes logs).
    """

    workdir: pathlib.Path
    config: Any
    start_step: int
    num_steps: int
    is_main_process: bool = True


class Callback:
    """Base class with no-op hooks; override the ones you need."""

    def on_train_start(self, run: RunInfo) -> None:
        pass

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_evaluate(self, step: int, variables: Any, setup: Setup) -> None:
        """The trainer evaluated `variables` ({"params": ...}, and "router_state" where the
        routers keep state) at `step` (`on_eval` follows with its results). They are live:
        valid only during this call (see the module docstring)."""

    def on_eval(self, step: int, results: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, path: pathlib.Path) -> None:
        pass

    def on_train_end(self, summary: dict[str, Any]) -> None:
        pass

    def on_train_abort(self, error: BaseException) -> None:
        """Training raised `error` (re-raised after every callback saw it): close files, stop
        traces. May follow `on_train_end` (when a later callback's raised): make it idempotent."""


CALLBACK_MEMBERS = (
    "on_train_start",
    "on_step_end",
    "on_evaluate",
    "on_eval",
    "on_checkpoint",
    "on_train_end",
    "on_train_abort",
)

# Callbacks of separately installed packages of this repository: naming one that is not
# installed says what to pip install.
PLUGIN_CALLBACKS = {"evaluators": "vmoe-eval"}

# The callback that runs `config.eval.evaluators` (vmoe-eval's `EvalCallback`).
EVALUATORS_CALLBACK = "evaluators"

CALLBACKS: vmoe_plugins.Registry[Callback] = vmoe_plugins.Registry(
    "vmoe_train_callbacks", "callback", members=CALLBACK_MEMBERS, known=PLUGIN_CALLBACKS
)


def register() -> None:
    """Adds the `vmoe_train_callbacks` hook and the built-in callbacks to the plugin host.

    Idempotent; runs at the import of this module (and may be called again from `vmoe_train`).
    """
    from vmoe_train import _builtins, hookspecs

    vmoe_plugins.add_hookspecs(hookspecs)
    vmoe_plugins.register_builtin("vmoe_train.builtins", _builtins)


def available_callbacks() -> list[str]:
    """Names of every installed callback (built-ins and plugins), sorted."""
    return CALLBACKS.names()


def callback_names(config: Any) -> tuple[str, ...]:
    """The callbacks a run of `config` uses: `log.callbacks`, then "evaluators" where
    `eval.evaluators` names any evaluator and `log.callbacks` does not name it already (the
    evaluators run only through that callback)."""
    from vmoe_train.config import config_get  # not at import: config imports callbacks

    names = config_get(config, "log.callbacks", ())
    if isinstance(names, str):  # refused, with its message, by `make_callbacks`
        return names
    names = tuple(names or ())
    if config_get(config, "eval.evaluators", ()) and EVALUATORS_CALLBACK not in names:
        names += (EVALUATORS_CALLBACK,)
    return names


def make_callbacks(names: Iterable[str], run: RunInfo) -> list[Callback]:
    """The callbacks registered as `names` (e.g. `config.log.callbacks`), built for `run`.

    Every name is looked up before any callback is built: an unknown one is a ValueError that
    lists the installed names (and suggests the closest). What a factory returns is checked to
    have every hook of `Callback`; a ValueError names the plugin it came from.
    """
    if isinstance(names, str):
        raise ValueError(
            f"callback names must be a tuple of names, not the string {names!r}; e.g. ({names!r},)"
        )
    names = tuple(names)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"callbacks {repeated} are named more than once in {names}")
    factories = [(name, CALLBACKS.factory(name)) for name in names]
    built = []
    for name, factory in factories:
        provider = CALLBACKS.provider(name)
        try:
            callback = factory(run)
        except Exception as error:
            error.add_note(f"while building callback {name!r} from {provider}")
            raise
        CALLBACKS.check_members(callback, f"callback {name!r} from {provider}")
        built.append(callback)
    return built


def _format(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class ProgressBar(Callback):
    """A tqdm progress bar over [start_step, num_steps] on stderr, in the main process only.

    Shows step/num_steps, steps/s and the ETA (tqdm's), with a postfix of the last logged loss
    (`LOSS`), images/s and learning rate. Images/s is the metric `IMAGES_PER_SEC` where the loop
    logs one, else measured here between logged steps (from the second one on, so that the
    compilation of the first step is not counted) times `batch_size`. Evaluation results are
    printed above the bar. The bar advances when the loop logs (every `log.every_steps` steps).

    Args:
      file: where to draw (default: `sys.stderr` at the start of training).
      batch_size: global batch size, for the measured images/s (`from_run`: `config.batch_size`).
      mininterval: least seconds between redraws.
    """

    LOSS = "train/loss"
    IMAGES_PER_SEC = ("train/images_per_sec", "train/images_per_second")
    LEARNING_RATE = ("train/learning_rate", "train/lr")

    def __init__(
        self, *, file: TextIO | None = None, batch_size: int | None = None, mininterval: float = 0.5
    ) -> None:
        self.file = file
        self.batch_size = batch_size
        self.mininterval = mininterval
        self._bar: tqdm.tqdm | None = None
        self._last: tuple[int, float] | None = None  # (step, time) of the last on_step_end

    @classmethod
    def from_run(cls, run: RunInfo) -> ProgressBar:
        from vmoe_train.config import config_get  # not at import: config imports callbacks

        batch_size = config_get(run.config, "batch_size")
        return cls(batch_size=batch_size if vmoe_plugins.is_int(batch_size) else None)

    def on_train_start(self, run: RunInfo) -> None:
        if not run.is_main_process:
            return
        self._file = self.file if self.file is not None else sys.stderr
        self._bar = tqdm.tqdm(
            total=run.num_steps,
            initial=run.start_step,
            file=self._file,
            unit="step",
            dynamic_ncols=True,
            mininterval=self.mininterval,
        )

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is None:
            return
        now = time.perf_counter()
        postfix = {}
        if self.LOSS in metrics:
            postfix["loss"] = _format(metrics[self.LOSS])
        images_per_sec = next((metrics[k] for k in self.IMAGES_PER_SEC if k in metrics), None)
        if images_per_sec is None and self.batch_size and self._last is not None:
            last_step, last_time = self._last
            if step > last_step and now > last_time:
                images_per_sec = (step - last_step) * self.batch_size / (now - last_time)
        if images_per_sec is not None:
            postfix["images/s"] = f"{float(images_per_sec):.1f}"
        lr = next((metrics[k] for k in self.LEARNING_RATE if k in metrics), None)
        if lr is not None:
            postfix["lr"] = f"{float(lr):.3g}"
        self._last = (step, now)
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(max(0, step - self._bar.n))

    def on_eval(self, step: int, results: dict[str, float]) -> None:
        if self._bar is None:
            return
        text = ", ".join(f"{name}={_format(value)}" for name, value in results.items())
        tqdm.tqdm.write(f"step {step}: {text}", file=self._file)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_train_abort(self, error: BaseException) -> None:
        self.on_train_end({})


class JsonlLogger(Callback):
    """Train metrics, evaluation results and a final summary, one JSON object per line.

    Lines: `{"step", "time", **metrics}` for every logged step and every evaluation (eval names
    carry their split: "validation/accuracy"), then `{"summary": summary, "time"}` at the end.
    Each line is flushed as written (`JsonlWriter`). Main process only.

    Args:
      path: the file (default: `run.workdir / "metrics.jsonl"`); appended to on resume.
    """

    FILENAME = "metrics.jsonl"

    def __init__(self, path: str | pathlib.Path | None = None) -> None:
        self.path = None if path is None else pathlib.Path(path)
        self._writer: JsonlWriter | None = None

    @classmethod
    def from_run(cls, run: RunInfo) -> JsonlLogger:
        return cls()

    def on_train_start(self, run: RunInfo) -> None:
        if run.is_main_process:
            self.path = self.path or pathlib.Path(run.workdir) / self.FILENAME
            self._writer = JsonlWriter(self.path)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self._writer is not None:
            self._writer.write_scalars(step, metrics)

    def on_eval(self, step: int, results: dict[str, float]) -> None:
        if self._writer is not None:
            self._writer.write_scalars(step, results)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self._writer is not None:
            self._writer.write({"summary": summary, "time": time.time()})
            self.on_train_abort(None)

    def on_train_abort(self, error: BaseException | None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TensorBoardLogger(Callback):
    """Train metrics and evaluation results as TensorBoard scalars (no TensorFlow needed).

    One event directory; tags are the metric names, so TensorBoard groups "train/..." and
    "validation/..." (and "train/moe_block_1/...") into sections. Flushed after every call, so a
    killed run keeps what it logged. Main process only.

    Args:
      logdir: the event directory (default: `run.workdir / "tensorboard"`).
    """

    DIRNAME = "tensorboard"

    def __init__(self, logdir: str | pathlib.Path | None = None) -> None:
        self.logdir = None if logdir is None else pathlib.Path(logdir)
        self._writer: TensorBoardWriter | None = None

    @classmethod
    def from_run(cls, run: RunInfo) -> TensorBoardLogger:
        return cls()

    def on_train_start(self, run: RunInfo) -> None:
        if run.is_main_process:
            self.logdir = self.logdir or pathlib.Path(run.workdir) / self.DIRNAME
            self._writer = TensorBoardWriter(self.logdir)

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is not None:
            self._writer.write_scalars(step, scalars)
            self._writer.flush()

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self._write(step, metrics)

    def on_eval(self, step: int, results: dict[str, float]) -> None:
        self._write(step, results)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_train_abort(self, error: BaseException) -> None:
        self.on_train_end({})


class Profiler(Callback):
    """A `jax.profiler` trace of `num_steps` steps from `start_step`, in the main process only.

    The trace starts at the first logged step at or after `start_step` (at the start of training
    if the run starts inside the window) and stops at the first logged step at least `num_steps`
    later, or at the end of training. Steps are seen every `log.every_steps`, so the window is
    rounded out to logged steps. The trace lands in `logdir/plugins/profile/<time>/` (open it
    with TensorBoard's profile plugin / XProf, or Perfetto). `num_steps=0` profiles nothing. A
    trace that cannot start (another one is running) is a warning, not an error.

    Args:
      start_step: first step of the window.
      num_steps: how many steps to trace (0 = off).
      logdir: the trace directory (default: `run.workdir / "profile"`).
    """

    DIRNAME = "profile"

    def __init__(
        self, start_step: int, num_steps: int, *, logdir: str | pathlib.Path | None = None
    ) -> None:
        check_int = vmoe_plugins.check_int
        self.start_step = check_int("start_step", start_step, low=0, where="Profiler: ")
        self.num_steps = check_int("num_steps", num_steps, low=0, where="Profiler: ")
        self.logdir = None if logdir is None else pathlib.Path(logdir)
        self._pending = False  # main process, window not reached yet
        self._started_at: int | None = None

    @classmethod
    def from_run(cls, run: RunInfo) -> Profiler:
        """From `config.log.profile_steps`: `(start_step, num_steps)`, or `n` for n steps from
        the first logged step (after the first step, which compiles); absent, 0 or () = off."""
        from vmoe_train.config import config_get  # not at import: config imports callbacks

        steps = config_get(run.config, "log.profile_steps")
        if steps is None or steps == 0 or (isinstance(steps, (tuple, list)) and not steps):
            return cls(0, 0)
        if vmoe_plugins.is_int(steps) and steps > 0:
            return cls(run.start_step + 1, steps)
        if isinstance(steps, (tuple, list)) and len(steps) == 2:
            return cls(*steps)
        raise ValueError(
            f"log.profile_steps={steps!r} must be (start_step, num_steps), a number of steps, "
            "or 0 (off)"
        )

    @property
    def tracing(self) -> bool:
        return self._started_at is not None

    def on_train_start(self, run: RunInfo) -> None:
        if not run.is_main_process or self.num_steps == 0:
            return
        self.logdir = self.logdir or pathlib.Path(run.workdir) / self.DIRNAME
        # Resumed past the window: nothing to trace.
        self._pending = run.start_step < self.start_step + self.num_steps
        if self.start_step <= run.start_step < self.start_step + self.num_steps:
            self._start(run.start_step)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        # Steps arrive every `log.every_steps`: the window is rounded out to them (a window
        # shorter than that cadence still gets a trace, of one cadence's steps).
        if self._started_at is not None:
            if step >= self._started_at + self.num_steps:
                self._stop()
        elif self._pending and step >= self.start_step:
            self._start(step)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self._started_at is not None:
            self._stop()
        self._pending = False

    def on_train_abort(self, error: BaseException) -> None:
        self.on_train_end({})

    def _start(self, step: int) -> None:
        import jax

        self._pending = False
        assert self.logdir is not None
        self.logdir.mkdir(parents=True, exist_ok=True)
        try:
            jax.profiler.start_trace(str(self.logdir))
        except RuntimeError as error:  # e.g. a trace is already running
            warnings.warn(f"Profiler: no trace at step {step}: {error}", stacklevel=2)
            return
        self._started_at = step

    def _stop(self) -> None:
        import jax

        self._started_at = None
        jax.profiler.stop_trace()


register()
