"""vmoe-train: train and fine-tune V-MoE and ViT models from configs, with orbax checkpoints.

    vmoe-train --config=digits_vmoe --workdir=runs/digits      # the command line
    summary = vmoe_train.train(vmoe_train.load_config("digits_vmoe"), "runs/digits")

Or compose your own loop from the parts: `create_train_state`, `make_train_step`,
`make_eval_step` (pure functions), `make_optimizer`, `Checkpointer`, callbacks.
`apply_rules` (vmoe_train.init_rules): a new model's parameters from another checkpoint's by
ordered (regex, template, transform) rules; `upcycle_rules` for a V-MoE from its dense twin.
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
from vmoe_train.init_rules import (
    UPCYCLE_KEEP_FRESH,
    InitRulesError,
    Rule,
    apply_rules,
    available_transforms,
    parse_rules,
    upcycle_rules,
)
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
    "UPCYCLE_KEEP_FRESH",
    "Callback",
    "CheckpointError",
    "CheckpointUnavailableError",
    "CheckpointWarning",
    "Checkpointer",
    "ConfigError",
    "InitRulesError",
    "JsonlLogger",
    "JsonlWriter",
    "Profiler",
    "ProgressBar",
    "Restored",
    "Rule",
    "RunInfo",
    "TensorBoardLogger",
    "TensorBoardWriter",
    "TrainState",
    "__version__",
    "apply_overrides",
    "apply_rules",
    "available_callbacks",
    "available_transforms",
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
    "parse_rules",
    "read_config",
    "resize_pos_embedding",
    "restore_params",
    "shipped_configs",
    "top1_correct",
    "train",
    "tune_cpu_malloc",
    "upcycle_rules",
    "validate_config",
]
