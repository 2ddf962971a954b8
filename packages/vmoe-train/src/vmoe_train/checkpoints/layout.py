"""Where checkpoints are, and which of them are complete: the one discovery path.

    location = locate("runs/digits")            # a run dir, its checkpoints/ or a <step>/ dir
    location.directory, location.step           # .../runs/digits/checkpoints, None
    scan(location.directory).complete           # [250, 500, 750]: steps that can be read

Every reader of checkpoints goes through `locate` (config validation, the trainer's resume and
fine-tuning, vmoe-eval, the CLIs) so that they accept the same paths and agree on what they
find. `scan` tells complete step directories from the others:

- complete: `<step>/` with its final name (orbax renames a finished save into place, or writes a
  commit record on object stores), a record of that commit, and every item (`ITEMS`);
- temporary: orbax's `<step>.orbax-checkpoint-tmp...` of a save that never finished: it was
  never a checkpoint, so it may be deleted;
- damaged: a final-named `<step>/` missing its commit record or an item. It was complete once
  (or is being tampered with): never restored, never deleted, moved aside by the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")  # what every checkpoint holds; "checksums" is optional
CHECKSUMS = "checksums"

__all__ = ["ITEMS", "Location", "Scan", "locate", "scan"]


@dataclasses.dataclass(frozen=True)
class Location:
    """Attributes:
    directory: the checkpoints directory (holding `<step>/` folders), absolute.
    step: the step the path named itself (a `<step>/` dir), else None (: the latest).
    """

    directory: pathlib.Path
    step: int | None


@dataclasses.dataclass(frozen=True)
class Scan:
    """Attributes:
    complete: the steps of complete checkpoints, ascending.
    temporary: {orbax temporary dir: reason} of saves that never finished.
    damaged: {final-named step dir: reason} of checkpoints missing a part.
    """

    complete: list[int]
    temporary: dict[pathlib.Path, str]
    damaged: dict[pathlib.Path, str]

    @property
    def damaged_steps(self) -> dict[int, str]:
        """{step: reason} of the damaged directories."""
        return {int(path.name): why for path, why in self.damaged.items()}

    @property
    def incomplete(self) -> dict[pathlib.Path, str]:
        """Temporary and damaged directories together, with their reasons."""
        return {**self.temporary, **self.damaged}


def locate(path: str | pathlib.Path) -> Location:
    """The checkpoints directory (and step) that `path` names: a run directory (with
    `checkpoints/`), a checkpoints directory (with `<step>/` folders) or one `<step>/` folder.

    Raises:
      FileNotFoundError: `path` does not exist, or is none of the three (the message says which
        forms are accepted).
    """
    path = pathlib.Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"no run or checkpoint at {str(path)!r}: it does not exist")
    if (path / "checkpoints").is_dir():
        return Location(path / "checkpoints", None)
    if path.is_dir() and path.name.isdigit() and any((path / i).is_dir() for i in ITEMS):
        return Location(path.parent, int(path.name))
    if path.is_dir() and any(_step_of(child) is not None for child in path.iterdir()):
        return Location(path, None)
    raise FileNotFoundError(
        f"{str(path)!r} holds no checkpoint: expected a run directory (with checkpoints/), a "
        "checkpoints directory (with <step>/ folders) or a <step>/ folder"
    )


def scan(directory: str | pathlib.Path) -> Scan:
    """The complete, temporary and damaged step directories under `directory` (see module doc);
    an empty Scan if `directory` does not exist."""
    directory = pathlib.Path(directory)
    complete: list[int] = []
    temporary: dict[pathlib.Path, str] = {}
    damaged: dict[pathlib.Path, str] = {}
    if not directory.is_dir():
        return Scan(complete, temporary, damaged)
    for path in directory.iterdir():
        if _step_of(path) is None:
            continue
        if ocp.step.is_path_temporary(path):
            temporary[path] = "an interrupted save: orbax's temporary directory, never committed"
        elif path.name.isdigit() and path.is_dir():
            reason = _damage(path)
            if reason:
                damaged[path] = reason
            else:
                complete.append(int(path.name))
    return Scan(sorted(complete), temporary, damaged)


def _step_of(path: pathlib.Path) -> int | None:
    """The step a step directory or orbax temporary directory is named for (else None)."""
    head = path.name.split(".", 1)[0]
    return int(head) if head.isdigit() and path.is_dir() else None


def _damage(path: pathlib.Path) -> str:
    """Why the final-named step directory `path` is not a complete checkpoint ("" if it is)."""
    missing = [item for item in ITEMS if not (path / item).is_dir()]
    if missing:
        return f"damaged: no item {', '.join(missing)}"
    if not orbax_commit_recorded(path):
        return "damaged: no commit record"
    return ""


# orbax writes these when it commits a step; its public API has no reader for them, so they are
# read here alone (tests/test_checkpoints.py fails if a new orbax stops writing them).
COMMIT_FILE = "commit_success.txt"
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


def orbax_commit_recorded(path: pathlib.Path) -> bool:
    """True if orbax recorded the commit of step directory `path`: its commit marker file, or
    a commit time in its step metadata."""
    if (path / COMMIT_FILE).is_file():
        return True
    try:
        metadata = json.loads((path / STEP_METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("commit_timestamp_nsecs") is not None
