"""The README's Python example runs as written (on a trained run), and every public name is
documented there."""

import pathlib
import re

import pytest

import vmoe_eval

README = pathlib.Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_example_runs_on_a_trained_run(trained, tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "digits"
    run_dir.parent.mkdir()
    run_dir.symlink_to(trained[0], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in BLOCKS:
        exec(compile(block, str(README), "exec"), namespace)
    assert (run_dir / "eval" / "sweep" / "sweep.png").stat().st_size > 0
    assert len(namespace["points"]) == 2 * 2 * 3  # routers x ks x capacity factors


@pytest.mark.parametrize("name", [n for n in vmoe_eval.__all__ if n != "__version__"])
def test_public_name_is_documented(name):
    assert f"`{name}" in README.read_text(), f"{name} is public but not in the README"
