"""The embedded digits: built offline by a tfds builder into ArrayRecord files, fixed splits,
the real sklearn pixels."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys

import numpy as np
import pytest
from absl import logging as absl_logging
from sklearn.datasets import load_digits

import vmoe_data
from vmoe_data.digits import _quiet_not_prepared_warning, digits_builder

SPLIT_SIZES = {"train": 1253, "validation": 180, "test": 364}
LABEL_COUNTS = {
    "train": [124, 127, 123, 128, 126, 127, 126, 125, 121, 126],
    "validation": [18] * 10,
    "test": [36, 37, 36, 37, 37, 37, 37, 36, 35, 36],
}


def _all(source):
    return [source[i] for i in range(len(source))]


def test_digits_is_the_default_dataset():
    assert vmoe_data.DEFAULT_DATASET == "digits"
    assert vmoe_data.get_dataset().name == "digits"


def test_split_sizes_are_fixed(digits):
    assert dict(digits.split_sizes) == SPLIT_SIZES
    assert {s: len(digits.source(s)) for s in SPLIT_SIZES} == SPLIT_SIZES


@pytest.mark.parametrize("split", sorted(SPLIT_SIZES))
def test_label_counts_per_split(digits, split):
    assert np.bincount(digits.labels(split), minlength=10).tolist() == LABEL_COUNTS[split]


def test_splits_partition_the_1797_sklearn_digits(digits):
    ids = np.concatenate(
        [[int(e["id"]) for e in _all(digits.source(split))] for split in SPLIT_SIZES]
    )
    assert sorted(ids.tolist()) == list(range(1797))


def test_images_are_the_sklearn_pixels_scaled_to_0_255(digits):
    sklearn = load_digits()
    for split in SPLIT_SIZES:
        for example in _all(digits.source(split)):
            i = int(example["id"])
            assert example["image"].shape == (8, 8, 1)
            assert example["image"].dtype == np.uint8
            expected = np.round(sklearn.images[i] * 255 / 16).astype(np.uint8)
            np.testing.assert_array_equal(example["image"][..., 0], expected)
            assert int(example["label"]) == sklearn.target[i]


def test_built_as_array_record_files_in_the_data_dir(digits, data_dir):
    files = sorted(p.name for p in (data_dir / "vmoe_digits" / "1.0.0").iterdir())
    for split in SPLIT_SIZES:
        assert any(f.startswith(f"vmoe_digits-{split}.array_record") for f in files), files
    assert digits_builder().info.file_format.value == "array_record"


def test_second_use_reads_the_built_files_without_rebuilding(digits, data_dir):
    files = list((data_dir / "vmoe_digits" / "1.0.0").glob("*array_record*"))
    before = {f: f.stat().st_mtime_ns for f in files}
    vmoe_data.get_dataset("digits")
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_data_dir_option_overrides_the_environment(tmp_path, data_dir):
    dataset = vmoe_data.get_dataset("digits", data_dir=str(tmp_path))
    assert dataset.split_sizes["test"] == SPLIT_SIZES["test"]
    assert (tmp_path / "vmoe_digits" / "1.0.0").is_dir()


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VMOE_DATA_DIR", str(tmp_path))
    assert vmoe_data.default_data_dir() == tmp_path
    monkeypatch.delenv("VMOE_DATA_DIR")
    assert str(vmoe_data.default_data_dir()).endswith(".cache/vmoe/tensorflow_datasets")


def test_builds_without_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    dataset = vmoe_data.get_dataset("digits", data_dir=str(tmp_path))
    assert len(dataset.source("train")) == SPLIT_SIZES["train"]


def test_split_order_is_the_same_on_every_build(digits, tmp_path):
    rebuilt = vmoe_data.get_dataset("digits", data_dir=str(tmp_path))
    ids = [int(e["id"]) for e in _all(digits.source("validation"))]
    assert [int(e["id"]) for e in _all(rebuilt.source("validation"))] == ids


def test_two_processes_building_at_once_both_get_the_dataset(tmp_path):
    code = (
        "import sys, vmoe_data; "
        "d = vmoe_data.get_dataset('digits', data_dir=sys.argv[1]); "
        "print(len(d.source('train')))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [o.strip().splitlines()[-1] for o in outputs] == ["1253", "1253"]


def test_first_build_and_second_use_print_nothing(tmp_path, run_python):
    # No tfds progress bars or "Downloading and preparing..." line, and no absl warning that the
    # not-yet-built dataset "has no dataset_info.json": nothing on stdout or stderr.
    code = "import sys, vmoe_data; vmoe_data.get_dataset('digits', data_dir=sys.argv[1])"
    first = run_python(code, str(tmp_path))
    assert (first.stdout + first.stderr) == "", first.stdout + first.stderr
    assert (tmp_path / "vmoe_digits" / "1.0.0" / "dataset_info.json").is_file()
    second = run_python(code, str(tmp_path))
    assert (second.stdout + second.stderr) == "", second.stdout + second.stderr


def _logging_state():
    loggers = [logging.getLogger(), logging.getLogger("absl")]
    return (
        [(lg.level, list(lg.filters), list(lg.handlers), lg.disabled) for lg in loggers],
        [(h.level, list(h.filters)) for lg in loggers for h in lg.handlers],
        logging.root.manager.disable,
        absl_logging.get_verbosity(),
    )


def test_first_build_leaves_logging_as_it_was(tmp_path):
    before = _logging_state()
    vmoe_data.get_dataset("digits", data_dir=str(tmp_path))
    assert _logging_state() == before


def test_only_the_expected_not_prepared_warning_is_dropped(tmp_path, caplog):
    variant = tmp_path / "vmoe_digits" / "1.0.0"
    with caplog.at_level(logging.WARNING, logger="absl"), _quiet_not_prepared_warning(variant):
        absl_logging.warning("Variant folder %s has no %s", variant, "dataset_info.json")
        absl_logging.warning("Variant folder %s has no %s", tmp_path / "other", "dataset_info.json")
        absl_logging.warning("Variant folder %s has no %s", variant, "features.json")
        absl_logging.error("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == [
        f"Variant folder {tmp_path / 'other'} has no dataset_info.json",
        f"Variant folder {variant} has no features.json",
        "something else went wrong",
    ]
