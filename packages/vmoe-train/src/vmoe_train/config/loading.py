"""Configs by name or path: `load_config("digits_vmoe")`, `load_config("path/to/my_config.py")`.

The shipped configs are the modules of `vmoe_train.configs` with a `get_config()`
(`shipped_configs()` lists them with the first line of their docstrings).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pathlib
import pkgutil
import re
import sys
from collections.abc import Mapping

from ml_collections import ConfigDict

from vmoe_train.config.fields import SHIPPED_PACKAGE, ConfigError

# Names of recipes that were replaced by the release's (issue 21): a clear error, not a different
# recipe under the old name (a run started with it would not resume under the new values anyway).
RENAMED = {
    "vmoe_s32_i1k": ("vmoe_s32_last2_i1k", "vmoe_s32_last2_i1k_ft_i1k_384"),
    "vmoe_b16_i21k": ("vmoe_b16_every2_i21k", "vmoe_b16_every2_i21k_ft_i1k_384"),
}


def shipped_configs() -> dict[str, str]:
    """The shipped configs: {name: the first line of its docstring}, sorted by name."""
    package = importlib.import_module(SHIPPED_PACKAGE)
    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{SHIPPED_PACKAGE}.{info.name}")
        if callable(getattr(module, "get_config", None)):  # base.py holds fields, no recipe
            found[info.name] = _first_line(module.__doc__)
    return found


def _first_line(doc: str | None) -> str:
    lines = [line.strip() for line in (doc or "").strip().splitlines()]
    return lines[0] if lines else ""


def _is_path(name_or_path: str) -> bool:
    return (
        name_or_path.endswith(".py")
        or "/" in name_or_path
        or os.sep in name_or_path
        or os.path.isfile(name_or_path)
    )


def config_name(name_or_path: str) -> str:
    """A short name for a config: the shipped name, or the file's stem for a path."""
    return pathlib.Path(name_or_path).stem if _is_path(name_or_path) else name_or_path


def load_config(name_or_path: str) -> ConfigDict:
    """The config of a shipped name ("digits_vmoe") or of a .py file with `get_config()`.

    Raises ConfigError for an unknown name (listing the shipped ones, with a close match), a
    missing file, or a module without `get_config()` / one that returns no ConfigDict. Errors
    raised by the file's own code propagate with their traceback.
    """
    where = f"config={name_or_path!r}"
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ConfigError([f"{where}: must be a shipped config name or a path to a .py file"])
    if _is_path(name_or_path):
        path = pathlib.Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError([f"{where}: no such file"])
        module_name = "_vmoe_config_" + re.sub(r"\W", "_", str(path.resolve()))
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError([f"{where}: cannot be imported as a Python module"])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
    else:
        shipped = shipped_configs()
        if name_or_path in RENAMED:
            raise ConfigError(
                [
                    f"{where}: renamed: the shipped recipes are now the V-MoE release's own, "
                    f"named for what they train: {', '.join(RENAMED[name_or_path])}"
                ]
            )
        if name_or_path not in shipped:
            hint = difflib.get_close_matches(name_or_path, shipped, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                [
                    f"{where}: unknown config{maybe}; shipped: {sorted(shipped)}, "
                    "or give a path to a .py file with get_config()"
                ]
            )
        module = importlib.import_module(f"{SHIPPED_PACKAGE}.{name_or_path}")
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError([f"{where}: the module has no get_config() function"])
    config = get_config()
    if isinstance(config, Mapping) and not isinstance(config, ConfigDict):
        config = ConfigDict(config)
    if not isinstance(config, ConfigDict):
        raise ConfigError(
            [f"{where}: get_config() returned a {type(config).__name__}, not a ConfigDict"]
        )
    return config
