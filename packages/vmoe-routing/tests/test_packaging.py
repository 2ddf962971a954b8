"""vmoe-routing installs with its pyproject version and depends only on jax, numpy and the plugin
host vmoe-plugins (pluggy)."""

import importlib.metadata
import pathlib
import re

try:  # Python 3.10 (the floor) has no tomllib
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

import vmoe_routing

PROJECT = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())[
    "project"
]


def test_installed_version_is_the_pyproject_version():
    assert (
        vmoe_routing.__version__ == PROJECT["version"] == importlib.metadata.version("vmoe-routing")
    )


def test_runtime_dependencies_are_only_jax_numpy_and_the_plugin_host():
    names = {
        re.split(r"[<>=!~ \[;]", r)[0]
        for r in importlib.metadata.requires("vmoe-routing")
        if "extra ==" not in r
    }
    assert names == {"jax", "numpy", "vmoe-plugins"}


def test_ships_type_information():
    assert (pathlib.Path(vmoe_routing.__file__).parent / "py.typed").exists()
