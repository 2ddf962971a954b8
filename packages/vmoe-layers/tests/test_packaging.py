"""The package installs with its declared version and its vmoe dependencies."""

import importlib
import importlib.metadata
import pathlib
import tomllib

import vmoe_layers

PROJECT = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())[
    "project"
]


def test_installed_version_is_the_pyproject_version():
    assert vmoe_layers.__version__ == PROJECT["version"]


def test_declared_vmoe_dependencies_import():
    names = [r.split(">")[0].split("=")[0].strip() for r in PROJECT["dependencies"]]
    for name in (n for n in names if n.startswith("vmoe-")):
        module = importlib.import_module(name.replace("-", "_"))
        assert module.__version__ == importlib.metadata.version(name)


def _lower_bound(requires_python: str) -> tuple[int, ...]:
    (spec,) = [part.strip() for part in requires_python.split(",") if ">=" in part]
    return tuple(int(n) for n in spec.removeprefix(">=").split("."))


def test_requires_python_is_at_least_what_the_installed_jax_requires():
    jax_requires = importlib.metadata.metadata("jax")["Requires-Python"]
    assert _lower_bound(PROJECT["requires-python"]) >= _lower_bound(jax_requires)
