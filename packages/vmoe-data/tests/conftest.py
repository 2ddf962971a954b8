"""Shared fixtures: the embedded digits are built once per test session, in a temporary dir."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import vmoe_data


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    """A fresh data dir for the session (`$VMOE_DATA_DIR`, inherited by subprocesses)."""
    path = tmp_path_factory.mktemp("vmoe_data_dir")
    previous = os.environ.get(vmoe_data.DATA_DIR_ENV)
    os.environ[vmoe_data.DATA_DIR_ENV] = str(path)
    yield path
    if previous is None:
        del os.environ[vmoe_data.DATA_DIR_ENV]
    else:
        os.environ[vmoe_data.DATA_DIR_ENV] = previous


@pytest.fixture(scope="session")
def digits(data_dir):
    """The embedded digits dataset, built into the session's data dir."""
    return vmoe_data.get_dataset("digits")


@pytest.fixture
def run_python():
    """`run_python(code, *args)`: runs `code` in a new Python process; checks it exits 0."""
    return _run_python


def _run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(params=["vectorized", "per_example"])
def both_paths(request, monkeypatch):
    """Runs a test over the pipelines' vectorised path (taken for in-memory splits whose pp ops
    all have a vectorised form) and again with every split read per example."""
    if request.param == "per_example":
        monkeypatch.setattr(vmoe_data.pipelines, "in_memory", lambda source, cache: None)
    return request.param
