"""The README's Python examples run as written, and every public name is documented there."""

import pathlib
import re

import pytest

import vmoe_plugins
import vmoe_train

README = pathlib.Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_examples_run_in_order(tmp_path, monkeypatch):
    assert len(BLOCKS) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    try:
        for block in BLOCKS:
            exec(compile(block.replace("/tmp/", f"{tmp_path}/"), str(README), "exec"), namespace)
    finally:
        vmoe_plugins.reset()
    # The composed loop learned something in 200 steps (chance is 10%).
    assert float(namespace["correct"] / namespace["count"]) > 0.5


@pytest.mark.parametrize("name", [n for n in vmoe_train.__all__ if n != "__version__"])
def test_public_name_is_documented(name):
    assert f"`{name}" in README.read_text(), f"{name} is public but not in the README"
