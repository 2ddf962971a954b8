"""`vmoe-eval`: every command writes what it lists; bad runs are one clear error each."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import matplotlib.image

from vmoe_eval import cli


def test_all_writes_every_output_it_lists_and_a_report(trained, tmp_path, capsys):
    workdir = trained[0]
    out = tmp_path / "eval"
    code = cli.main(
        ["all", str(workdir), "--out", str(out), "--shots", "1,2", "--seeds", "0",
         "--capacity-factors", "0.25,1.0", "--ks", "1"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    listed = re.findall(r"^\w+: wrote (.+)$", printed, flags=re.MULTILINE)
    assert len(listed) >= 9  # 2 json, 3 sweep files, json + md + 2 PNGs per MoE layer
    for path in listed:
        assert pathlib.Path(path).stat().st_size > 0, path
    for png in [p for p in listed if p.endswith(".png")]:
        assert matplotlib.image.imread(png).size > 0
    report = (out / "report.md").read_text()
    assert "## Accuracy" in report and "## Few-shot" in report and "sweep/sweep.png" in report
    accuracy = json.loads((out / "accuracy" / "accuracy.json").read_text())
    assert accuracy["test/examples"] == 364


def test_a_missing_run_is_one_clear_error(tmp_path, capsys):
    assert cli.main(["accuracy", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert "no run or checkpoint at" in error and "does not exist" in error
    assert error.count("\n") == 1


def test_a_checkpoint_of_another_model_config_is_one_clear_error(trained, tmp_path, capsys):
    # The saved config says 8 experts; the saved params have 4 per MoE layer.
    workdir = tmp_path / "copy"
    shutil.copytree(trained[0] / "checkpoints", workdir / "checkpoints")
    code = cli.main(["accuracy", str(workdir), "--set", "model.moe.num_experts=8"])
    assert code == 2
    error = capsys.readouterr().err
    assert "the checkpoint does not fit the model" in error
    assert "checkpoint (4, " in error and "vs model (8, " in error
