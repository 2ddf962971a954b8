"""Trainings in subprocesses (train_worker.py) for the kill-and-resume and multi-process tests:
run one, run one across two jax.distributed processes on localhost, read what they wrote."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np

WORKER = pathlib.Path(__file__).with_name("train_worker.py")


def run(workdir, *args, killed=False, timeout=600, env=None):
    """train_worker.py WORKDIR ARGS in a subprocess; it must exit 0 (or die of SIGKILL)."""
    result = subprocess.run(
        [sys.executable, str(WORKER), str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if killed:
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def two_processes(workdir, *args) -> list[str]:
    """train_worker.py in two processes of one jax.distributed run; their stdouts."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(workdir),
                *args,
                "--set",
                f"distributed.coordinator_address={address}",
                "--set",
                "distributed.num_processes=2",
                "--set",
                f"distributed.process_id={i}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def leaves(tree) -> dict[str, np.ndarray]:
    """{key path: array} of a parameter tree."""
    import jax

    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def losses(workdir) -> dict[int, float]:
    """{step: train/loss} from a run's metrics.jsonl."""
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
