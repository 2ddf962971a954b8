"""The README's Python examples run as written."""

import pathlib

import vmoe_plugins


def test_readme_examples_run():
    vmoe_plugins.run_readme_examples(pathlib.Path(__file__).parents[1] / "README.md")
