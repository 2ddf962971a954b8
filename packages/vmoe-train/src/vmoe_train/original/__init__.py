"""The original V-MoE release's checkpoints: read, write, map onto vmoe-layers, convert.

    arrays = read_checkpoint("ckpts/vmoe_s32_last2_ilsvrc2012")   # {original path: array}
    params = params_from_original(arrays)                          # our params tree
    convert("ckpts/vmoe_s32_last2_ilsvrc2012", "runs/s32", config)  # a vmoe-train run
    export_run("runs/s32", "exported/s32")                          # and back

The format (`files`, `wire`), the names (`mapping`), the model and the settings that reproduce
the original forward pass (`architecture`), the conversion (`convert`) and the way back
(`export`): one module each.
"""

from __future__ import annotations

from vmoe_train.mismatch import TreeMismatchError
from vmoe_train.original.architecture import (
    RELEASE_MOE,
    RELEASE_ROUTER_OPTIONS,
    Architecture,
    infer_architecture,
    model_fields,
)
from vmoe_train.original.convert import Converted, convert, converted_config, parameters_only
from vmoe_train.original.export import export_params, export_run
from vmoe_train.original.files import read_checkpoint, read_index, write_checkpoint
from vmoe_train.original.mapping import (
    check_fit,
    params_from_original,
    params_to_original,
    to_original,
    to_ours,
)
from vmoe_train.original.wire import FormatError, IndexEntry

__all__ = [
    "RELEASE_MOE",
    "RELEASE_ROUTER_OPTIONS",
    "Architecture",
    "Converted",
    "FormatError",
    "IndexEntry",
    "TreeMismatchError",
    "check_fit",
    "convert",
    "converted_config",
    "export_params",
    "export_run",
    "infer_architecture",
    "model_fields",
    "parameters_only",
    "params_from_original",
    "params_to_original",
    "read_checkpoint",
    "read_index",
    "to_original",
    "to_ours",
    "write_checkpoint",
]
