"""The README's Python examples run as written; public names and hooks are documented."""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest

import vmoe_layers
import vmoe_plugins as plugins
from vmoe_layers import hookspecs

README = pathlib.Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)]


def test_readme_has_an_example_per_capability():
    assert len(BLOCKS) >= 6


def test_readme_examples_run_in_order():
    namespace: dict = {}
    try:
        for block in BLOCKS:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        for name in ("relu2", "replicated", "halve"):
            if name in dict(plugins.plugin_manager().list_name_plugin()):
                plugins.unregister_plugin(name)


@pytest.mark.parametrize("name", [n for n in vmoe_layers.__all__ if n != "__version__"])
def test_public_name_is_documented(name):
    assert f"`{name}" in README.read_text(), f"{name} is public but not in the README"


@pytest.mark.parametrize("hook", HOOKS)
def test_hooks_are_documented_with_an_example(hook):
    assert hook in ("vmoe_expert_types", "vmoe_sharding_strategies", "vmoe_moe_variants")
    assert f"`{hook}" in README.read_text()
    assert "Example::" in getattr(hookspecs, hook).__doc__
