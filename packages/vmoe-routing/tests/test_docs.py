"""The README's Python examples run as written, and every public name is documented there."""

import pathlib
import re

import pytest

import vmoe_plugins as plugins
import vmoe_routing

README = pathlib.Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


def test_readme_examples_run_in_order():
    plugins.reset()
    namespace: dict = {}
    try:
        for block in BLOCKS:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        plugins.reset()


@pytest.mark.parametrize("name", [n for n in vmoe_routing.__all__ if n != "__version__"])
def test_public_name_is_documented(name):
    assert f"`{name}" in README.read_text(), f"{name} is public but not in the README"


def test_hookspecs_have_docstrings_with_an_example():
    from vmoe_routing import hookspecs

    assert "Example::" in hookspecs.vmoe_routers.__doc__
