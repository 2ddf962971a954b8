"""Checkpoints with orbax-checkpoint: the whole train state, sharded, async, nothing pickled.

    ckpt = Checkpointer(workdir / "checkpoints", every_steps=1000, keep=3)
    if ckpt.steps():                                           # resume
        restored = ckpt.restore(abstract_like(state))          # latest complete one
        state, iterator_state = restored.state, restored.data_state
    ...
    ckpt.save(step, state, data_state=it.get_state(), config=cfg.to_dict())  # every N steps
    ckpt.save(step, state, data_state=..., config=..., force=True)            # at the end
    ckpt.close()                                               # waits for the async write

A checkpoint is the directory `directory/<step>/`, written by an orbax `CheckpointManager`, with
one item per part, each in a format that holds no Python objects:

- `state/`: the `TrainState` (step, params, opt_state, rng key data) as arrays (`StandardSave`:
  OCDBT/zarr, each process writing the slices its devices hold). Restored from a tree of
  `jax.ShapeDtypeStruct`s whose `.sharding` says where every array goes, so a checkpoint saved
  on one mesh restores onto any other (another strategy, more or fewer devices, one device).
- `data/`: the input iterator's state (JSON, e.g. `{"batches": 7}`).
- `config/`: the run's config (JSON, e.g. `config.to_dict()`), readable alone by `read_config`.
- `checksums/`: a 32-bit fingerprint of every array of `state` (JSON). OCDBT and zarr check
  their own structure but not the array bytes: a flipped bit in a data file restores silently
  as a wrong value. The fingerprint is an integer sum, the same whatever the sharding, computed
  on the devices holding the arrays at save time and again after every restore.
- `metrics/` (orbax's, only with `keep_best`): the metrics the best checkpoint is chosen by.

Completion and corruption: see `layout` (which step directories are complete) and `reading`
(`restore` tries the newest complete checkpoint; one that cannot be read now is retried, then
an error; a corrupt one is skipped for the previous one). A corrupt or damaged checkpoint is
never deleted: once an older one has restored, it is moved to `<directory>.corrupt/<step>` and
reported (a `CheckpointWarning`), so it no longer counts among the `keep` newest and its step
can be saved again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vmoe_train.checkpoints import integrity
from vmoe_train.checkpoints.layout import CHECKSUMS, ITEMS, scan
from vmoe_train.checkpoints.reading import CheckpointWarning, restore_latest
from vmoe_train.state import TrainState

__all__ = [
    "Checkpointer",
    "Restored",
    "abstract_like",
    "best_mode_of",
    "read_config",
    "restore_params",
    "restore_router_state",
]

BEST_MODES = ("auto", "max", "min")


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` returns.

    Attributes:
      step: the checkpoint's step (its directory name).
      state: the `TrainState`, laid out as the abstract state asked for.
      data_state: the input iterator's state, as saved (JSON).
      config: the run's config, as saved (JSON).
      path: the step directory it was read from.
    """

    step: int
    state: TrainState
    data_state: dict
    config: dict
    path: pathlib.Path


def best_mode_of(metric: str, mode: str = "auto") -> str:
    """ "max" or "min": which end of `metric` is best. "auto" follows the name: losses and errors
    are best small, accuracies (precision, recall, ...) large; other names must say."""
    if mode not in BEST_MODES:
        raise ValueError(f"best mode {mode!r} for {metric!r}; allowed: {BEST_MODES}")
    if mode != "auto":
        return mode
    name = metric.rsplit("/", 1)[-1].lower()
    if name.endswith(("loss", "error", "err", "perplexity")):
        return "min"
    if name.endswith(("accuracy", "acc", "precision", "recall", "f1", "auc")):
        return "max"
    raise ValueError(
        f"cannot tell whether a larger or a smaller {metric!r} is better; state the mode: 'max' "
        "or 'min'"
    )


# ---------------------------------------------------------------------------------------------
# The Checkpointer.


class Checkpointer:
    """Saves and restores `TrainState` checkpoints in `directory/<step>/` (see the module doc).

    Args:
      directory: where the step directories live (created if missing).
      every_steps: `should_save(step)` is true every `every_steps` steps; 0 saves only when
        forced (e.g. at the end).
      keep: how many of the newest checkpoints to keep (older ones are deleted after each
        save); 0 keeps all.
      keep_best: a metric name (a key of the `metrics` given to `save`, e.g.
        "validation/accuracy"): the best checkpoint by it is also kept, whatever its age.
      best_mode: "max" or "min": which end of `keep_best` is best; "auto" (default) follows
        the metric's name (`best_mode`: losses and errors min, accuracies max).
      async_save: write in a background thread (`save` returns once the arrays are copied to
        host memory, so the caller may donate or overwrite them); `wait`, the next `save` and
        `close` wait for it.
      collective: restore as one decision of every process (see `reading`); default: when
        jax runs more than one process. Every process must then call `restore` together.
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        every_steps: int,
        keep: int,
        keep_best: str = "",
        best_mode: str = "auto",
        async_save: bool = True,
        collective: bool | None = None,
    ):
        if not isinstance(every_steps, int) or every_steps < 0:
            raise ValueError(f"every_steps={every_steps!r} must be an integer >= 0")
        if not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep={keep!r} must be an integer >= 0 (0: keep all)")
        if best_mode not in BEST_MODES:
            raise ValueError(f"best_mode={best_mode!r}; allowed: {BEST_MODES}")
        self.directory = pathlib.Path(directory).absolute()  # orbax needs absolute paths
        self.every_steps = every_steps
        self.keep = keep
        self.keep_best = keep_best
        self.best_mode = best_mode = best_mode_of(keep_best, best_mode) if keep_best else "max"
        self.collective = jax.process_count() > 1 if collective is None else collective
        self._closed = False

        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep or None)]
        best_fn = None
        if keep_best:
            best_fn = _metric_getter(keep_best, best_mode)
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,  # makes orbax store the metrics with each step
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(*ITEMS, CHECKSUMS)
        )

    def should_save(self, step: int) -> bool:
        """True when `step` is a multiple of `every_steps` (never when every_steps is 0)."""
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        data_state: dict,
        config: dict,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> pathlib.Path | None:
        """Starts writing checkpoint `step` (returns before it is on disk when async).

        Args:
          step: the step number, the directory's name.
          state: the `TrainState` (any sharding; each process writes its own slices).
          data_state: the input iterator's `get_state()` (JSON-serialisable).
          config: the run's config as JSON-serialisable values (e.g. `config.to_dict()`).
          metrics: scalars, used (and needed) for `keep_best`.
          force: save even if `should_save(step)` is false (e.g. the last step).

        Returns:
          The step directory, or None when nothing was written: not a save step, this step is
          already saved (e.g. a forced final save right after a periodic one), or a newer
          checkpoint exists (the run was restarted from an older one: orbax does not mix runs).
        """
        step = int(step)
        if not force and not self.should_save(step):
            return None
        data_state = _json_copy(data_state, "data_state")  # also: immune to later mutation
        config = _json_copy(config, "config")
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        # Computed on the devices while the previous save may still be writing.
        checksums = {
            "algorithm": integrity.FINGERPRINT_ALGORITHM,
            "arrays": integrity.fingerprints(state),
        }
        self.wait()
        self._move_aside(scan(self.directory).damaged_steps)
        existing = list(self._manager.all_steps())
        if step in existing:
            return None
        if existing and max(existing) > step:
            warnings.warn(
                f"{self._step_dir(step)}: not saved, a newer checkpoint "
                f"{self._step_dir(max(existing))} exists",
                CheckpointWarning,
                stacklevel=2,
            )
            return None
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
                checksums=ocp.args.JsonSave(checksums),
            ),
            metrics=metrics,
            force=True,  # the decision is ours (should_save above), not orbax's interval
        )
        return self._step_dir(step) if saved else None

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, ascending (read from disk, not cached)."""
        return scan(self.directory).complete

    def restore(self, abstract_state: TrainState, step: int | None = None) -> Restored:
        """The checkpoint `step` (default: the latest that restores), laid out as asked.

        Args:
          abstract_state: a `TrainState` of `jax.ShapeDtypeStruct`s (see `abstract_like`) whose
            shardings say where each array goes: any mesh, whatever the checkpoint was saved
            on. Shapes must match the saved ones; dtypes may differ (arrays are cast).
          step: a step to restore, exactly (no fallback); None: the latest complete one; if it
            is corrupt, the previous one, and so on (each skipped one is a `CheckpointWarning`,
            and is moved aside once an older one has restored).

        Raises:
          FileNotFoundError: there is no checkpoint at all.
          CheckpointUnavailableError: the checkpoint cannot be read now (retried first).
          CheckpointError: none could be restored (every path and reason in the message).
        """
        self.wait()

        def read(path: pathlib.Path) -> Restored:
            abstract, written_before_router_state = _abstract_for(path, abstract_state)
            args = {
                "state": ocp.args.StandardRestore(abstract),
                "data": ocp.args.JsonRestore(),
                "config": ocp.args.JsonRestore(),
            }
            if (path / CHECKSUMS).is_dir():
                args[CHECKSUMS] = ocp.args.JsonRestore()
            out = self._manager.restore(int(path.name), args=ocp.args.Composite(**args))
            if CHECKSUMS in args:
                integrity.verify(out.state, out[CHECKSUMS])
            state = TrainState(**out.state) if written_before_router_state else out.state
            return Restored(int(path.name), state, out.data, out.config, path)

        restored, _, corrupt = restore_latest(
            self.directory, step, read, collective=self.collective
        )
        # Only now, with an older checkpoint read by the same abstract state, are the newer
        # failures known to be the checkpoints' fault (not, say, a wrong abstract state).
        self._move_aside(corrupt)
        return restored

    def data_state(self, step: int | None = None) -> dict:
        """The input iterator's state saved with checkpoint `step` (default: the latest
        readable); only that JSON item is read. Fallback and errors as `restore`."""
        self.wait()
        return _read_json_item(self.directory, "data", step)

    def wait(self) -> None:
        """Blocks until the pending async save (if any) is on disk; raises its error, if any."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the pending save, then releases orbax's threads (again: nothing)."""
        if self._closed:
            return
        self._closed = True
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _move_aside(self, bad: Mapping[int, str]) -> None:
        """Moves the step directories `bad` ({step: reason}) to `<directory>.corrupt/` (process
        0; every process waits for it): a run that resumed from an older step must neither keep
        them among its newest nor be stopped by them from saving their step again, and they are
        not the trainer's to delete."""
        if not bad and not self.collective:
            return
        if jax.process_index() == 0:  # the one decision: process 0's view of the directory
            for step, why in sorted(bad.items()):
                moved = move_aside(self._step_dir(step))
                warnings.warn(
                    f"{self._step_dir(step)}: moved to {moved}, it cannot be restored ({why})",
                    CheckpointWarning,
                    stacklevel=3,
                )
        if self.collective:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("vmoe_train: checkpoints moved aside")
        self._manager.reload()


def _abstract_for(path: pathlib.Path, abstract_state: TrainState) -> tuple[Any, bool]:
    """(what to restore step dir `path` into, whether it was written before `TrainState` had
    `router_state`). Such a checkpoint (vmoe-train before 0.1's router state) lacks the field:
    it restores into the other fields, with no router state, which is right for its stateless
    routers; a model whose routers keep state cannot resume from it (its state is not there)."""
    saved = ocp.PyTreeCheckpointHandler().metadata(path / "state").tree
    if "router_state" in saved:
        return abstract_state, False
    if jax.tree.leaves(abstract_state.router_state):
        raise ValueError(
            f"{path} holds no router state (it was written by a vmoe-train before routers "
            "could keep state), but this model's routers keep state (e.g. a balancing bias): "
            "resume it with the router it was trained with, or start a new run"
        )
    fields = ("step", "params", "opt_state", "rng")
    return {field: getattr(abstract_state, field) for field in fields}, True


def move_aside(step_dir: pathlib.Path) -> pathlib.Path:
    """Renames `step_dir` (`<directory>/<step>`) to `<directory>.corrupt/<step>` (or
    `<step>.1`, `.2`, ... if taken) and returns the new path."""
    aside = step_dir.parent.with_name(step_dir.parent.name + ".corrupt")
    aside.mkdir(exist_ok=True)
    target, n = aside / step_dir.name, 0
    while target.exists():
        n += 1
        target = aside / f"{step_dir.name}.{n}"
    step_dir.rename(target)
    return target


# ---------------------------------------------------------------------------------------------
# Reading without a Checkpointer (fine-tuning, evaluation).


def read_config(directory: str | pathlib.Path, step: int | None = None) -> dict:
    """The config saved with checkpoint `step` (default: the latest readable) of `directory`.

    Only that JSON item is read, no arrays. Fallback and errors as `Checkpointer.restore`.
    """
    return _read_json_item(pathlib.Path(directory).absolute(), "config", step)


def _read_json_item(directory: pathlib.Path, item: str, step: int | None) -> Any:
    def read(path: pathlib.Path) -> Any:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            out = checkpointer.restore(
                path, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
            )
        return out[item]

    return restore_latest(directory, step, read)[0]


def restore_params(
    directory: str | pathlib.Path,
    abstract_params: Any = None,
    step: int | None = None,
    *,
    with_step: bool = False,
) -> Any:
    """Only the `params` of checkpoint `step` (default: the latest readable) of `directory`
    (`restore_router_state` reads the routers' state beside them).

    For starting from another run's weights (another optimizer, another config): nothing else
    of the state is read or needs to match.

    Args:
      directory: a `Checkpointer`'s directory (`locate` finds it from a run or step dir).
      abstract_params: a tree of `jax.ShapeDtypeStruct`s (with shardings: jax arrays laid out
        so, each process reading only its slices; without: host numpy arrays), with the saved
        tree structure and shapes; or a function from the saved params' tree of
        `ShapeDtypeStruct`s (shapes and dtypes, read from the checkpoint's metadata) to such a
        tree, e.g. to lay out the arrays that fit a new model and read the others on the host.
        None: host numpy arrays with the saved shapes and dtypes.
      step: as `Checkpointer.restore` (None: the latest, falling back past corrupt ones).
      with_step: return `(params, step)`: the step actually read.

    Returns:
      The params tree; every array is checked against its saved fingerprint.
    """
    directory = pathlib.Path(directory).absolute()

    def read(path: pathlib.Path) -> Any:
        return _read_state_field(path, "params", abstract_params, required=True)

    params, read_step, _ = restore_latest(directory, step, read, collective=jax.process_count() > 1)
    return (params, read_step) if with_step else params


def restore_router_state(
    directory: str | pathlib.Path, step: int, abstract_state: Any = None
) -> dict[str, Any]:
    """The routers' state (`TrainState.router_state`) of checkpoint `step` of `directory`,
    exactly that step; {} where the checkpoint has none (stateless routers, or a checkpoint
    written before the field existed). `abstract_state` as `restore_params`' abstract_params
    (None: host numpy arrays). Checked against the saved fingerprints."""
    path = pathlib.Path(directory).absolute() / str(int(step))
    return dict(_read_state_field(path, "router_state", abstract_state, required=False) or {})


def _read_state_field(path: pathlib.Path, field: str, abstract: Any, *, required: bool) -> Any:
    """One field of the `state` item of step dir `path` (see `restore_params`), or None where it
    is absent and not `required`."""
    item = abstract
    if item is None or callable(item):
        saved = ocp.PyTreeCheckpointHandler().metadata(path / "state").tree
        if field not in saved:
            if required:
                raise ValueError(f"the saved state has no {field!r}")
            return None
        shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[field])
        item = shapes if item is None else item(shapes)
    if not jax.tree.leaves(item):
        return item  # nothing to read (an empty router state)
    restore_args = jax.tree.map(_restore_arg, item)
    args = {
        "state": ocp.args.PyTreeRestore(
            item={field: item}, restore_args={field: restore_args}, partial_restore=True
        )
    }
    if (path / CHECKSUMS).is_dir():
        args[CHECKSUMS] = ocp.args.JsonRestore()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        out = checkpointer.restore(path, args=ocp.args.Composite(**args))
    if CHECKSUMS in args:
        integrity.verify(out.state, out[CHECKSUMS])
    return out.state[field]


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """A tree of `jax.ShapeDtypeStruct` with the shapes and dtypes of `tree`'s arrays.

    Args:
      tree: arrays (jax or numpy) or `ShapeDtypeStruct`s, e.g. a freshly built `TrainState`.
      shardings: where to restore: None keeps each leaf's own `.sharding` (none for numpy
        arrays: restored on the host); one `jax.sharding.Sharding` for every leaf (e.g.
        `SingleDeviceSharding(jax.devices()[0])`); or a tree of them matching `tree`.
    """

    def leaf(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=sharding)

    if shardings is None:
        return jax.tree.map(lambda x: leaf(x, getattr(x, "sharding", None)), tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: leaf(x, shardings), tree)
    return jax.tree.map(leaf, tree, shardings)


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _metric_getter(name: str, mode: str) -> Callable[[Mapping[str, Any]], float]:
    worst = -math.inf if mode == "max" else math.inf

    def get(metrics: Mapping[str, Any]) -> float:
        value = (metrics or {}).get(name)
        return worst if value is None else float(value)

    return get


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic | np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, pathlib.PurePath):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _json_copy(value: Any, what: str) -> Any:
    """A JSON-safe deep copy (tuples become lists, numpy scalars numbers); a clear error for
    anything else, raised here rather than in orbax's writer thread."""
    try:
        return json.loads(json.dumps(value, default=_json_default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable (no pickling): {e}") from None


def _dtype(x: Any) -> np.dtype:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _restore_arg(x: Any) -> ocp.RestoreArgs:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
    return ocp.ArrayRestoreArgs(sharding=sharding, dtype=x.dtype, global_shape=tuple(x.shape))
