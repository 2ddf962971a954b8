"""vmoe-plugins installs with its pyproject version and depends on pluggy only."""

import importlib.metadata
import pathlib
import re

try:  # Python 3.10 (the floor) has no tomllib
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

import vmoe_plugins

PROJECT = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())[
    "project"
]


def test_installed_version_is_the_pyproject_version():
    assert (
        vmoe_plugins.__version__ == PROJECT["version"] == importlib.metadata.version("vmoe-plugins")
    )


def test_runtime_dependency_is_only_pluggy():
    names = {
        re.split(r"[<>=!~ \[;]", r)[0]
        for r in importlib.metadata.requires("vmoe-plugins")
        if "extra ==" not in r
    }
    assert names == {"pluggy"}


def test_ships_type_information():
    assert (pathlib.Path(vmoe_plugins.__file__).parent / "py.typed").exists()
