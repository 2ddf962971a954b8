"""Shared test setup: the helpers next to this file are importable (pytest runs in importlib
mode), and the embedded digits are built once per session into a temporary data dir
(`$VMOE_DATA_DIR`, inherited by the worker subprocesses)."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vmoe_train_data_dir")
    previous = os.environ.get("VMOE_DATA_DIR")
    os.environ["VMOE_DATA_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["VMOE_DATA_DIR"]
    else:
        os.environ["VMOE_DATA_DIR"] = previous
