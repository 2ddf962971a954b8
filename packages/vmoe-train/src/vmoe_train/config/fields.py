"""What every config shares: the allowed values of the closed fields, the open and union fields,
and `ConfigError`, the error that lists a config's problems, each naming its field."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from ml_collections import ConfigDict

SHIPPED_PACKAGE = "vmoe_train.configs"
DEFAULT_CONFIG = "digits_vmoe"
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
LOSSES = ("softmax", "sigmoid")
DTYPES = ("float32", "bfloat16")
DATA_CACHE = {"auto": None, "always": True, "never": False}  # -> vmoe_data pipelines' `cache`
DISPATCH_DTYPES = ("", *DTYPES)  # "" = the compute dtype
MU_DTYPES = ("", *DTYPES)  # "" = the params' dtype
NU_DTYPES = ("", *DTYPES)  # "" = float32, whatever the params' dtype
EXPERT_INITS = ("independent", "shared")
CLASSIFIERS = ("token", "gap")
REMAT = ("none", "block", "moe", "dots")  # vmoe_layers.REMAT (a test keeps them equal)
# `model.name` is a vmoe-layers preset ("V-MoE-S/32") or a family alone, whose sizes are then
# all given by the size fields (0 = the preset's).
MODEL_FAMILIES = ("ViT", "V-MoE")
MODEL_SIZE_FIELDS = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim")
KEEP_BEST_METRICS = ("accuracy", "loss")
# In pp.train, replaced by the process's local device count when the pipeline is built (e.g. the
# V-MoE release's per-device mixup: `mixup(0.2, groups={local_devices}, largest_first=True)`).
LOCAL_DEVICES = "{local_devices}"


def resolve_pp(spec: str, local_devices: int) -> str:
    """`spec` with every `LOCAL_DEVICES` replaced by `local_devices`."""
    return spec.replace(LOCAL_DEVICES, str(int(local_devices)))


# Dicts of free-form options: any key may be added (by an override or a config file), at any
# depth below them (model.moe.variants.<variant name>.<option>).
OPEN_FIELDS = ("model.moe.router_options", "model.moe.variants")


def is_open(path: str) -> bool:
    """Whether `path` is an open field or lies inside one."""
    return any(path == f or path.startswith(f + ".") for f in OPEN_FIELDS)


# Fields that take more than one type (the base config's value fixes the type of the others).
UNION_FIELDS: Mapping[str, tuple[type, ...]] = {
    "model.moe.layers": (str, tuple),
    "log.profile_steps": (int, tuple),
}
# Mesh axes of the built-in sharding strategies (plugins: not checked).
STRATEGY_AXES: Mapping[str, tuple[str, ...]] = {
    "data": ("data",),
    "expert": ("data", "expert"),
    "fsdp": ("data", "fsdp"),
    "expert_fsdp": ("data", "expert"),
}


class ConfigError(ValueError):
    """A config with problems; `problems` lists them all, each naming its field."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"{n} problem{'' if n == 1 else 's'} in the config:{lines}")


TYPE_NAMES = {
    bool: "True or False",
    int: "an integer",
    float: "a number",
    str: "a string",
    tuple: "a tuple",
}


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def unknown_field(name: str, node: ConfigDict, prefix: str) -> str:
    keys = sorted(node.keys())
    hint = difflib.get_close_matches(name, keys, n=1)
    maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown field{maybe}; the fields of {prefix or 'the config'} are {keys}"
