"""vmoe-train: train and fine-tune V-MoE and ViT models from configs, with orbax checkpoints.

    vmoe-train --config=digits_vmoe --workdir=runs/digits      # the command line
    summary = vmoe_train.train(vmoe_train.load_config("digits_vmoe"), "runs/digits")

Or compose your own loop from the parts: `create_train_state`, `make_train_step`,
`make_eval_step` (pure functions), `make_optimizer`, `Checkpointer`, callbacks.
`tune_cpu_malloc()` (vmoe_train.host): have glibc keep freed memory for reuse in CPU training
loops; opt-in, call it first thing in a script.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_train import callbacks as _callbacks
from vmoe_train.callbacks import (
    CALLBACKS,
    Callback,
    JsonlLogger,
    Profiler,
    ProgressBar,
    RunInfo,
    TensorBoardLogger,
    available_callbacks,
    make_callbacks,
)
from vmoe_train.checkpoints import (
    Checkpointer,
    CheckpointError,
    CheckpointUnavailableError,
    CheckpointWarning,
    Restored,
    read_config,
    restore_params,
)
from vmoe_train.config import (
    ConfigError,
    apply_overrides,
    check_config,
    load_config,
    shipped_configs,
    validate_config,
)
from vmoe_train.finetune import finetune_params, resize_pos_embedding
from vmoe_train.host import tune_cpu_malloc
from vmoe_train.losses import classification_loss, top1_correct
from vmoe_train.metric_writers import JsonlWriter, TensorBoardWriter
from vmoe_train.optim import make_optimizer, make_schedule
from vmoe_train.state import TrainState
from vmoe_train.steps import create_train_state, make_eval_step, make_train_step
from vmoe_train.trainer import evaluate, train

__version__ = importlib.metadata.version("vmoe-train")

_callbacks.register()

__all__ = [
    "CALLBACKS",
    "Callback",
    "CheckpointError",
    "CheckpointUnavailableError",
    "CheckpointWarning",
    "Checkpointer",
    "ConfigError",
    "JsonlLogger",
    "JsonlWriter",
    "Profiler",
    "ProgressBar",
    "Restored",
    "RunInfo",
    "TensorBoardLogger",
    "TensorBoardWriter",
    "TrainState",
    "__version__",
    "apply_overrides",
    "available_callbacks",
    "check_config",
    "classification_loss",
    "create_train_state",
    "evaluate",
    "finetune_params",
    "load_config",
    "make_callbacks",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "read_config",
    "resize_pos_embedding",
    "restore_params",
    "shipped_configs",
    "top1_correct",
    "train",
    "tune_cpu_malloc",
    "validate_config",
]
