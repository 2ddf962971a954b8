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

Completion: orbax writes into `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` when
every item is on disk (atomic rename; on object stores, a `commit_success.txt` file instead);
the rename is preceded by writing `commit_success.txt` and the commit time into
`_CHECKPOINT_METADATA`. A step directory counts as complete here when it has its final name, a
record of that commit (either file) and its three items. Anything else (a temporary directory
left by a killed save, a directory missing its commit record or an item) is incomplete: never
restored, and reported by `restore` when newer than the checkpoint it returns.

Corruption: `restore` (and `restore_params`, `read_config`) try the newest complete checkpoint
first; if reading it fails (a truncated or garbled file: orbax/TensorStore raise) or a restored
array does not match its saved fingerprint, a `CheckpointWarning` names the step directory and
the reason, and the previous one is tried, down to the oldest. If none restores, a
`CheckpointError` lists every path and reason. Checkpoints found unrestorable (or incomplete)
are deleted by the next `save`: the run has moved past them and they must not count among the
`keep` newest.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import pathlib
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vmoe_train.state import TrainState

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "Checkpointer",
    "Restored",
    "abstract_like",
    "read_config",
    "restore_params",
]

ITEMS = ("state", "data", "config")  # what every checkpoint holds; CHECKSUMS is optional
CHECKSUMS = "checksums"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step still being written
COMMIT_FILE = "commit_success.txt"  # orbax's commit marker
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's step metadata, with the commit time
_FINGERPRINT_ALGORITHM = "fmix32-sum-v1"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (incomplete or unreadable) or deleted; one line: path, reason."""


class CheckpointError(RuntimeError):
    """No checkpoint could be restored; the message lists each path tried and why it failed."""


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
      best_mode: "max" or "min": which end of `keep_best` is best.
      async_save: write in a background thread (`save` returns once the arrays are copied to
        host memory, so the caller may donate or overwrite them); `wait`, the next `save` and
        `close` wait for it.
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        every_steps: int,
        keep: int,
        keep_best: str = "",
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if not isinstance(every_steps, int) or every_steps < 0:
            raise ValueError(f"every_steps={every_steps!r} must be an integer >= 0")
        if not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep={keep!r} must be an integer >= 0 (0: keep all)")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode={best_mode!r}; allowed: 'max', 'min'")
        self.directory = pathlib.Path(directory).absolute()  # orbax needs absolute paths
        self.every_steps = every_steps
        self.keep = keep
        self.keep_best = keep_best
        self.best_mode = best_mode
        # Steps that failed to restore, with the reason: deleted by the next save.
        self._unrestorable: dict[int, str] = {}

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
        checksums = {"algorithm": _FINGERPRINT_ALGORITHM, "arrays": _fingerprints(state)}
        self.wait()
        self._delete_bad_steps()
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
        return _scan(self.directory)[0]

    def restore(self, abstract_state: TrainState, step: int | None = None) -> Restored:
        """The checkpoint `step` (default: the latest that restores), laid out as asked.

        Args:
          abstract_state: a `TrainState` of `jax.ShapeDtypeStruct`s (see `abstract_like`) whose
            shardings say where each array goes: any mesh, whatever the checkpoint was saved
            on. Shapes must match the saved ones; dtypes may differ (arrays are cast).
          step: a step to restore, exactly (no fallback); None: the latest complete one, and
            on failure the previous one, and so on (each failure is a `CheckpointWarning`).

        Raises:
          FileNotFoundError: there is no checkpoint at all.
          CheckpointError: none could be restored (every path and reason in the message).
        """
        self.wait()

        def read(path: pathlib.Path) -> Restored:
            args = {
                "state": ocp.args.StandardRestore(abstract_state),
                "data": ocp.args.JsonRestore(),
                "config": ocp.args.JsonRestore(),
            }
            if (path / CHECKSUMS).is_dir():
                args[CHECKSUMS] = ocp.args.JsonRestore()
            out = self._manager.restore(int(path.name), args=ocp.args.Composite(**args))
            if CHECKSUMS in args:
                _verify(out.state, out[CHECKSUMS])
            return Restored(int(path.name), out.state, out.data, out.config, path)

        failed: dict[int, str] = {}
        restored = _restore_latest(self.directory, step, read, failed)
        # Only now, with an older checkpoint read by the same abstract state, are the newer
        # failures known to be the checkpoints' fault (not, say, a wrong abstract state).
        self._unrestorable = failed
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
        """Waits for the pending save, then releases orbax's threads."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _delete_bad_steps(self) -> None:
        """Deletes checkpoints orbax counts but that cannot be restored (found so by `restore`,
        or incomplete): a run that resumed from an older step must not keep them among its
        newest, nor be stopped by them from saving their step again."""
        _, incomplete = _scan(self.directory)
        bad = dict(self._unrestorable)
        bad.update({int(p.name): r for p, r in incomplete.items() if p.name.isdigit()})
        for step in self._manager.all_steps():
            if step in bad:
                warnings.warn(
                    f"{self._step_dir(step)}: deleted, it cannot be restored ({bad[step]})",
                    CheckpointWarning,
                    stacklevel=3,
                )
                self._manager.delete(step)
        self._unrestorable.clear()


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

    return _restore_latest(directory, step, read)


def restore_params(
    directory: str | pathlib.Path, abstract_params: Any = None, step: int | None = None
) -> Any:
    """Only the `params` of checkpoint `step` (default: the latest readable) of `directory`.

    For starting from another run's weights (another optimizer, another config): nothing else
    of the state is read or needs to match.

    Args:
      directory: a `Checkpointer`'s directory.
      abstract_params: a tree of `jax.ShapeDtypeStruct`s (with shardings: jax arrays laid out
        so; without: host numpy arrays), with the saved tree structure and shapes. None: host
        numpy arrays with the saved shapes and dtypes.
      step: as `Checkpointer.restore` (None: the latest, falling back to older ones).

    Returns:
      The params tree; every array is checked against its saved fingerprint.
    """
    directory = pathlib.Path(directory).absolute()

    def read(path: pathlib.Path) -> Any:
        item = abstract_params
        if item is None:
            saved = ocp.PyTreeCheckpointHandler().metadata(path / "state").tree
            if "params" not in saved:
                raise ValueError("the saved state has no 'params'")
            item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved["params"])
        restore_args = jax.tree.map(_restore_arg, item)
        args = {
            "state": ocp.args.PyTreeRestore(
                item={"params": item}, restore_args={"params": restore_args}, partial_restore=True
            )
        }
        if (path / CHECKSUMS).is_dir():
            args[CHECKSUMS] = ocp.args.JsonRestore()
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            out = checkpointer.restore(path, args=ocp.args.Composite(**args))
        if CHECKSUMS in args:
            _verify(out.state, out[CHECKSUMS])
        return out.state["params"]

    return _restore_latest(directory, step, read)


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
# Completeness, fallback.


def _scan(directory: pathlib.Path) -> tuple[list[int], dict[pathlib.Path, str]]:
    """(complete steps ascending, {incomplete step dir: reason}) under `directory`."""
    complete: list[int] = []
    incomplete: dict[pathlib.Path, str] = {}
    if not directory.is_dir():
        return complete, incomplete
    for path in directory.iterdir():
        name = path.name
        if TMP_SUFFIX in name and name.split(".", 1)[0].isdigit():
            incomplete[path] = "an interrupted save: orbax's temporary directory, never committed"
        elif name.isdigit() and path.is_dir():
            reason = _incomplete_reason(path)
            if reason:
                incomplete[path] = reason
            else:
                complete.append(int(name))
    return sorted(complete), incomplete


def _incomplete_reason(path: pathlib.Path) -> str:
    """Why the step directory `path` is not a complete checkpoint ("" if it is)."""
    missing = [item for item in ITEMS if not (path / item).is_dir()]
    if missing:
        return f"incomplete: no item {', '.join(missing)}"
    if (path / COMMIT_FILE).is_file():
        return ""
    try:
        metadata = json.loads((path / STEP_METADATA_FILE).read_text())
        committed = metadata.get("commit_timestamp_nsecs")
    except (OSError, ValueError, AttributeError):
        committed = None
    if committed is None:
        return f"incomplete: no commit record ({COMMIT_FILE}, {STEP_METADATA_FILE})"
    return ""


def _step_of(path: pathlib.Path) -> int:
    return int(path.name.split(".", 1)[0])


def _restore_latest(
    directory: pathlib.Path,
    step: int | None,
    read: Callable[[pathlib.Path], Any],
    failed: dict[int, str] | None = None,
) -> Any:
    """`read(step_dir)` of `step`, or of the newest complete step that reads, warning about
    each one skipped; failures are recorded in `failed` (step -> reason)."""
    complete, incomplete = _scan(directory)
    if step is not None:
        path = directory / str(int(step))
        if int(step) not in complete:
            reason = incomplete.get(path, "no such checkpoint")
            raise CheckpointError(f"cannot restore {path}: {reason} (complete: {complete})")
        ok, value = _attempt(read, path)
        if not ok:
            raise CheckpointError(f"cannot restore {path}: {value}")
        return value
    if not complete and not incomplete:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    tried: list[str] = []
    newest_complete = complete[-1] if complete else -1
    for path, reason in sorted(incomplete.items(), key=lambda kv: _step_of(kv[0])):
        tried.append(f"{path}: {reason}")
        if _step_of(path) > newest_complete:
            warnings.warn(f"{path}: skipped, {reason}", CheckpointWarning, stacklevel=3)
    for s in reversed(complete):
        path = directory / str(s)
        ok, value = _attempt(read, path)
        if ok:
            return value
        if failed is not None:
            failed[s] = value
        tried.append(f"{path}: {value}")
        warnings.warn(
            f"{path}: cannot be restored ({value}); trying the previous checkpoint",
            CheckpointWarning,
            stacklevel=3,
        )
    raise CheckpointError(f"no checkpoint in {directory} can be restored:\n  " + "\n  ".join(tried))


def _attempt(read: Callable[[pathlib.Path], Any], path: pathlib.Path) -> tuple[bool, Any]:
    """(True, read(path)), or (False, the one-line reason it failed).

    When orbax fails to read a checkpoint, it closes its event loop with reads still in flight:
    as they complete (in TensorStore's threads) and as the dead coroutines are collected, Python
    reports "Exception ignored" (`sys.unraisablehook`): echoes of the failure, which is
    already reported (the reason, then a `CheckpointWarning` or `CheckpointError`). So after a
    failed read, its garbage is collected and the echoes from orbax, TensorStore and asyncio
    are dropped until they stop (`_ECHO_QUIET_S` without one, at most `_ECHO_WAIT_S`); any
    other unraisable exception is passed on to the hook.
    """
    previous = sys.unraisablehook
    caught: list[Any] = []

    def hook(unraisable: Any) -> None:
        caught.append(unraisable)

    sys.unraisablehook = hook
    try:
        try:
            return True, read(path)
        except Exception as e:
            reason = _reason(e)  # `e`, whose frames hold orbax's dead coroutines, goes here
        start = last = time.monotonic()
        seen = -1
        while (now := time.monotonic()) - last < _ECHO_QUIET_S and now - start < _ECHO_WAIT_S:
            gc.collect()
            if len(caught) != seen:
                seen, last = len(caught), now
            time.sleep(_ECHO_QUIET_S / 5)
        return False, reason
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous
        for unraisable in caught:
            if not _is_orbax_echo(unraisable):
                previous(unraisable)


_ECHO_QUIET_S = 0.25
_ECHO_WAIT_S = 3.0


def _is_orbax_echo(unraisable: Any) -> bool:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    files = [getattr(code, "co_filename", "")]
    tb = unraisable.exc_traceback
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return any("orbax" in f or "tensorstore" in f for f in files)


def _reason(e: BaseException) -> str:
    """One line saying why a restore failed: the root cause's type and first line."""
    chain = [e]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None:
        if cause in chain or len(chain) > 8:
            break
        chain.append(cause)
    root = chain[-1]
    text = (str(root).strip().splitlines() or [""])[0]
    for cut in (" [tensorstore_spec=", " See full TensorStore details"):
        text = text.split(cut, 1)[0]
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


# ---------------------------------------------------------------------------------------------
# Array fingerprints: a 32-bit integer per array, independent of its sharding.

_GOLDEN = 0x9E3779B9  # the index is mixed in so that moved values change the fingerprint too


def _bits_dtype(dtype: np.dtype) -> Any:
    """The unsigned integer type of the same width as `dtype` (None: not fingerprinted)."""
    if dtype == np.bool_:
        return np.uint8
    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}.get(dtype.itemsize)


def _mix(xp: Any, bits: Any, index: Any) -> Any:
    """murmur3's 32-bit finaliser of (bits ^ index * golden): a bijection of the bits, so one
    changed value always changes the (wrapping) sum."""
    h = bits ^ (index * xp.uint32(_GOLDEN))
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _fingerprint_jax(x: jax.Array) -> jax.Array:
    """Traced: the uint32 fingerprint of one array, elementwise then a sum (no reshape, so a
    sharded array is never gathered)."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint8)
    else:
        bits = jax.lax.bitcast_convert_type(x, _bits_dtype(np.dtype(x.dtype)))
    bits = bits.astype(jnp.uint32)  # 8-byte types: a trailing axis of 2 words
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    return jnp.sum(_mix(jnp, bits, index), dtype=jnp.uint32)


def _fingerprint_np(x: np.ndarray) -> int:
    """The same as `_fingerprint_jax`, on the host."""
    flat = np.ascontiguousarray(x).reshape(-1)
    bits = flat.astype(np.uint8) if x.dtype == np.bool_ else flat.view(_bits_dtype(x.dtype))
    bits = bits.reshape(*x.shape, 2) if bits.size == 2 * x.size else bits.reshape(x.shape)
    bits = bits.astype(np.uint32)
    index = np.arange(bits.size, dtype=np.uint64).astype(np.uint32).reshape(bits.shape)
    with np.errstate(over="ignore"):
        return int(np.sum(_mix(np, bits, index), dtype=np.uint32))


_fingerprint_all = jax.jit(lambda xs: [_fingerprint_jax(x) for x in xs])


def _leaf_name(path: tuple) -> str:
    """A leaf's name, e.g. params/block_1/moe/experts/w_in: the same whether "params" is a
    TrainState field or a dict key (`restore_params` reads it as the latter)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(getattr(k, "key", k)))
    return "/".join(parts)


def _fingerprintable(x: Any) -> bool:
    try:
        return _bits_dtype(np.dtype(x.dtype)) is not None
    except (AttributeError, TypeError):  # not an array, or a typed PRNG key
        return False


def _fingerprints(tree: Any) -> dict[str, dict]:
    """{leaf name: {"dtype", "shape", "fingerprint"}} of every array leaf of `tree`: jax arrays
    in one jit on their own devices, numpy arrays on the host."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    named = [(_leaf_name(p), x) for p, x in leaves if _fingerprintable(x)]
    on_device = [(n, x) for n, x in named if isinstance(x, jax.Array)]
    values = {n: _fingerprint_np(np.asarray(x)) for n, x in named if not isinstance(x, jax.Array)}
    if on_device:
        sums = jax.device_get(_fingerprint_all([x for _, x in on_device]))
        values.update({n: int(s) for (n, _), s in zip(on_device, sums, strict=True)})
    return {
        n: {"dtype": np.dtype(x.dtype).name, "shape": list(np.shape(x)), "fingerprint": values[n]}
        for n, x in named
    }


def _verify(tree: Any, checksums: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first array of `tree` whose fingerprint differs from the
    saved one (arrays restored with another dtype or shape are not compared)."""
    if checksums.get("algorithm") != _FINGERPRINT_ALGORITHM:
        return
    saved = checksums.get("arrays", {})
    wanted = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _leaf_name(path)
        entry = saved.get(name)
        if (
            entry is not None
            and _fingerprintable(x)
            and entry["dtype"] == np.dtype(x.dtype).name
            and entry["shape"] == list(np.shape(x))
        ):
            wanted[name] = x
    actual = _fingerprints(wanted)
    for name in wanted:
        if actual[name]["fingerprint"] != saved[name]["fingerprint"]:
            raise ValueError(
                f"array {name!r} does not match its saved checksum (the data file is corrupt)"
            )


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
