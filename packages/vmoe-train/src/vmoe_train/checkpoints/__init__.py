"""Checkpoints with orbax-checkpoint: save, find, verify and restore the whole train state.

- `manager`: the `Checkpointer` (save every n steps, keep the newest and the best, restore),
  `restore_params`, `restore_router_state` and `read_config` for reading another run's
  checkpoints.
- `layout`: the one discovery path (`locate`: a run, its checkpoints/ or a step dir) and which
  step directories are complete (`scan`).
- `reading`: the newest readable checkpoint: retry what cannot be read now, skip what is
  corrupt, one decision across processes.
- `integrity`: array fingerprints, and corrupt vs cannot-be-read-now.
"""

from vmoe_train.checkpoints.integrity import CorruptCheckpointError
from vmoe_train.checkpoints.layout import ITEMS, Location, Scan, locate, scan
from vmoe_train.checkpoints.manager import (
    Checkpointer,
    Restored,
    abstract_like,
    best_mode_of,
    read_config,
    restore_params,
    restore_router_state,
)
from vmoe_train.checkpoints.reading import (
    CheckpointError,
    CheckpointUnavailableError,
    CheckpointWarning,
)

__all__ = [
    "ITEMS",
    "CheckpointError",
    "CheckpointUnavailableError",
    "CheckpointWarning",
    "Checkpointer",
    "CorruptCheckpointError",
    "Location",
    "Restored",
    "Scan",
    "abstract_like",
    "best_mode_of",
    "locate",
    "read_config",
    "restore_params",
    "restore_router_state",
    "scan",
]
