"""The built-in training callbacks and init transforms, registered through the same hooks as
third-party plugins."""

from __future__ import annotations

from vmoe_plugins import hookimpl


@hookimpl
def vmoe_train_callbacks():
    # Imported when the hook is called, not at import: vmoe_train.callbacks registers this module
    # at its own import, and must find the hookimpl above already defined, whichever is first.
    from vmoe_train import callbacks

    return {
        "progress": callbacks.ProgressBar.from_run,
        "jsonl": callbacks.JsonlLogger.from_run,
        "tensorboard": callbacks.TensorBoardLogger.from_run,
        "profile": callbacks.Profiler.from_run,
    }


@hookimpl
def vmoe_train_init_transforms():
    from vmoe_train import init_rules  # at call time, as above

    return {
        "copy": init_rules.copy_array,
        "tile": init_rules.tile_experts,
        "zoom": init_rules.zoom_pos_embedding,
        "drop": init_rules.drop_source,
    }
