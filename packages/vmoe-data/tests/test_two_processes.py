"""Two real processes (jax.distributed on localhost): per-process sharding by
jax.process_index / process_count covers the dataset exactly once."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

WORKER = """
import json, sys
import jax
jax.distributed.initialize(
    coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])
)
import vmoe_data

train = vmoe_data.train_pipeline(
    "digits", batch_size=64, seed=3, num_epochs=1, drop_remainder=False, pp="keep('id')"
)
train_batches = [b["id"][b["mask"]].tolist() for b in train]
train_sizes = [len(b["id"]) for b in train]
dropped = vmoe_data.train_pipeline("digits", batch_size=66, num_epochs=1, pp="keep('id')")
dropped_sizes = [len(b["id"]) for b in dropped]
evaluation = vmoe_data.eval_pipeline("digits", batch_size=64, pp="keep('id')")
eval_batches = [b["id"][b["mask"]].tolist() for b in evaluation]
print(json.dumps({
    "process": [jax.process_index(), jax.process_count()],
    "train": train_batches,
    "train_sizes": train_sizes,
    "dropped_sizes": dropped_sizes,
    "eval": eval_batches,
}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(digits):
    """What each of two jax processes read: {process index: report}."""
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, address, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    reports = {}
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        reports[report["process"][0]] = report
    return reports


def _ids(digits, split):
    source = digits.source(split)
    return sorted(int(source[i]["id"]) for i in range(len(source)))


def test_each_process_knows_its_index_and_count(two_processes):
    assert {i: r["process"] for i, r in two_processes.items()} == {0: [0, 2], 1: [1, 2]}


def test_train_processes_get_half_the_batch_each_in_every_batch(two_processes):
    for report in two_processes.values():
        assert report["train_sizes"] == [32] * 20  # ceil(1253 / 64), the last one padded


def test_train_processes_run_the_same_number_of_batches_with_drop_remainder(two_processes):
    for report in two_processes.values():  # 1253 // 66 = 18; 1253 mod 66 = 65 is in [B-P, B)
        assert report["dropped_sizes"] == [33] * 18


def test_train_epoch_union_is_the_dataset_each_example_once(two_processes, digits):
    seen = [i for r in two_processes.values() for b in r["train"] for i in b]
    assert sorted(seen) == _ids(digits, "train")


def test_train_processes_read_disjoint_examples(two_processes):
    first, second = ({i for b in r["train"] for i in b} for r in two_processes.values())
    assert not first & second


def test_eval_processes_count_every_example_once(two_processes, digits):
    seen = [i for r in two_processes.values() for b in r["eval"] for i in b]
    assert sorted(seen) == _ids(digits, "test")


def test_eval_processes_run_the_same_number_of_batches(two_processes):
    assert len(two_processes[0]["eval"]) == len(two_processes[1]["eval"]) == 6  # ceil(364/64)
