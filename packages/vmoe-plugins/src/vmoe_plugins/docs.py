"""Runnable READMEs: the ```python blocks of a README, executed in order by a package's tests."""

from __future__ import annotations

import os
import re

_PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", flags=re.DOTALL)


def readme_examples(path: str | os.PathLike) -> list[str]:
    """The code of every ```python block of the Markdown file at `path`, in order."""
    with open(path, encoding="utf-8") as f:
        return _PYTHON_BLOCK.findall(f.read())


def run_readme_examples(path: str | os.PathLike) -> dict:
    """Executes the README's python blocks in order in one namespace (which it returns).

    Raises a ValueError if the README has no python block (a test of nothing must fail)."""
    blocks = readme_examples(path)
    if not blocks:
        raise ValueError(f"{path} has no ```python block to run")
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)
    return namespace
