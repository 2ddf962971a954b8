"""The README's Python examples run as written; every public name and hook is documented."""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest

import vmoe_data
from vmoe_data import hookspecs

README = pathlib.Path(__file__).parents[1] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)
HOOKS = [
    f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("vmoe_")
]


def test_readme_has_an_example_per_capability():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"{README}:block{index}", "exec"), {})
    assert capsys.readouterr().out  # every example shows its result


@pytest.mark.parametrize("name", [n for n in vmoe_data.__all__ if n != "__version__"])
def test_public_name_is_documented(name):
    assert f"`{name}" in TEXT, f"{name} is public but not in the README"


@pytest.mark.parametrize("hook", HOOKS, ids=lambda f: f.__name__)
def test_hook_is_documented_with_an_example(hook):
    assert hook.__name__ in TEXT
    assert "Called once" in hook.__doc__ and "Returns:" in hook.__doc__
    assert "Example::" in hook.__doc__


def test_every_builtin_op_is_in_the_readme():
    for op in vmoe_data.available_preprocess_ops():
        if vmoe_data.PP_OPS.provider(op).startswith("vmoe_data.builtins"):
            assert f"`{op}(" in TEXT, op
