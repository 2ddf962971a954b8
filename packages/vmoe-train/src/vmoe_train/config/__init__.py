"""Training configs: load them by name or path, override fields, validate them, save them.

A config is a Python file with `get_config() -> ml_collections.ConfigDict` and a docstring
saying what it trains and how long it takes. The shipped ones live in `vmoe_train.configs`
(`shipped_configs()` lists them); `vmoe_train/configs/base.py` documents every field.

    config = load_config("digits_vmoe")                  # or load_config("path/to/my_config.py")
    config = apply_overrides(config, ["model.moe.router=bpr", "model.moe.router_options.k=1"])
    check_config(config, num_devices=jax.device_count())  # ConfigError listing every problem

`validate_config` checks every field before anything compiles and reports all problems at
once, each naming its field: numbers out of range, unknown names (dataset, model, router,
expert type, strategy, optimizer, ...), router options the router refuses (K > E), batches that
do not split over processes and devices, routing groups that do not divide the tokens, pp specs
that fail on the data, a fine-tuning checkpoint that is not there.

One idea per module: `loading` (names and paths), `overrides` ("a.b=value"), `validation`
(`validate_config`, `check_config`; its checks in `data_checks`, `model_checks` and
`training_checks`, on the `checker` framework), `serialisation` (JSON, `config_get`), `fields`
(`ConfigError` and the allowed values). The builders of a run's parts from a config (model,
dataset, ...) are in `vmoe_train.setup`.
"""

from __future__ import annotations

from vmoe_train.config.fields import (  # noqa: F401 (importable from here, as before the split)
    CLASSIFIERS,
    DATA_CACHE,
    DEFAULT_CONFIG,
    DISPATCH_DTYPES,
    DTYPES,
    KEEP_BEST_METRICS,
    LOSSES,
    MODEL_FAMILIES,
    MODEL_SIZE_FIELDS,
    OPEN_FIELDS,
    OPTIMIZERS,
    REMAT,
    SCHEDULES,
    SHIPPED_PACKAGE,
    STRATEGY_AXES,
    UNION_FIELDS,
    ConfigError,
)
from vmoe_train.config.loading import config_name, load_config, shipped_configs
from vmoe_train.config.overrides import apply_overrides
from vmoe_train.config.serialisation import (  # noqa: F401 (config_get: importable, not in __all__)
    config_from_json,
    config_get,
    config_to_json,
)
from vmoe_train.config.validation import check_config, validate_config

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "apply_overrides",
    "check_config",
    "config_from_json",
    "config_name",
    "config_to_json",
    "load_config",
    "shipped_configs",
    "validate_config",
]
