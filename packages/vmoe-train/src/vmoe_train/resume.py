"""Resume checks what it resumes: the saved config against the current one.

    notes = check_resume(saved_json, current_json, allow=config.resume.allow_changes, where=...)

A run killed and started again must continue the same trajectory. Fields that change it (the
model, the data and its preprocessing for training, the batch, the schedule and optimizer, the
loss, the seed, `num_steps`) are refused when they differ from the checkpoint's config, with a
message listing each difference and the override that accepts it on purpose
(`--config.resume.allow_changes=num_steps`; a group name such as `optimizer` accepts all of its
fields). Fields that do not change it (logging, evaluation, checkpointing cadence, callbacks,
where the data lives, the sharding layout, fine-tuning settings that only apply to a fresh
start) pass and are returned as notes for the log.

A field missing from the saved config (saved by an older vmoe-train) counts as its default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["HARMLESS", "ResumeConfigError", "check_resume", "config_changes"]

# Fields (or groups, ending in ".") whose change leaves the trajectory alone.
HARMLESS = (
    "log.",
    "eval.",
    "eval_batch_size",
    "checkpoint.",
    "distributed.",
    "resume.",
    "finetune.",  # read only when a run starts from scratch
    "sharding.",  # the layout: the same maths (floats may round differently on another mesh)
    "dataset.data_dir",
    "dataset.num_workers",
    "dataset.cache",
    "dataset.eval_splits",
    "dataset.test_split",
    "pp.eval",
)
_ABSENT = "<absent>"


class ResumeConfigError(ValueError):
    """The current config changes the trajectory of the run it would resume."""


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and name != "model.moe.router_options":
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = _plain(value)
    return flat


def _plain(value: Any) -> Any:
    """Lists and tuples alike (JSON has no tuples), mappings as sorted items."""
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items()))
    return value


def config_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any] = ()
) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (saved value, current value)} for every field that differs (JSON data in;
    a field absent from `saved` counts as its value in `defaults`, if there)."""
    old, new, base = _flatten(saved), _flatten(current), _flatten(dict(defaults))
    changes = {}
    for name in sorted(set(old) | set(new)):
        before = old.get(name, base.get(name, _ABSENT))
        after = new.get(name, _ABSENT)
        if before != after:
            changes[name] = (before, after)
    return changes


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """`name` is one of `patterns`, or in one of their groups ("optimizer" or "optimizer.")."""
    for pattern in patterns:
        group = pattern if pattern.endswith(".") else pattern + "."
        if name == pattern or name.startswith(group):
            return True
    return False


def _show(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def check_resume(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    allow: Iterable[str] = (),
    defaults: Mapping[str, Any] = (),
    where: str = "the checkpoint",
) -> list[str]:
    """Notes (one line per changed field that passes) for resuming a run saved with `saved`
    under `current`; raises ResumeConfigError listing every field that changes the trajectory
    and is not in `allow`."""
    allow = tuple(str(a) for a in allow)
    changes = config_changes(saved, current, defaults)
    refused = {
        n: c for n, c in changes.items() if not _matches(n, HARMLESS) and not _matches(n, allow)
    }
    if refused:
        lines = [f"  {n}: {_show(a)} (saved) -> {_show(b)} (now)" for n, (a, b) in refused.items()]
        accept = ",".join([*allow, *refused])
        raise ResumeConfigError(
            f"resume: the config differs from the one {where} was saved with, in fields that "
            "change the training trajectory:\n"
            + "\n".join(lines)
            + "\nResume with the saved values, use a new workdir, or accept the changes on "
            f"purpose: --config.resume.allow_changes={accept}"
        )
    return [f"{n}: {_show(a)} -> {_show(b)}" for n, (a, b) in changes.items()]
