"""`vmoe-eval`: every command writes what it lists; bad runs are one clear error each."""

from __future__ import annotations

import csv
import json
import pathlib
import re
import shutil

import matplotlib.image
import numpy as np
import pytest

from vmoe_eval import cli, evaluators


def test_all_writes_every_output_it_lists_and_a_report(trained, trained_run, tmp_path, capsys):
    workdir, summary, _ = trained
    out = tmp_path / "eval"
    code = cli.main(
        ["all", str(workdir), "--out", str(out), "--shots", "1,2", "--seeds", "0",
         "--capacity-factors", "0.25,1.0", "--ks", "1"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    listed = re.findall(r"^(\w+): wrote (.+)$", printed, flags=re.MULTILINE)
    assert sorted((c, str(pathlib.Path(p).relative_to(out))) for c, p in listed) == sorted(
        [
            ("accuracy", "accuracy/accuracy.json"),
            ("fewshot", "fewshot/fewshot.json"),
            *[("sweep", f"sweep/sweep.{ext}") for ext in ("csv", "json", "png")],
            *[("routing", f"routing/routing.{ext}") for ext in ("json", "md")],
            ("routing", "routing/routing_moe_block_1.png"),
            ("routing", "routing/positions_moe_block_1.png"),
        ]
    )
    for _, png in [item for item in listed if item[1].endswith(".png")]:
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and float(np.std(image)) > 0, png
    assert printed.rstrip().endswith(f"report: {out / 'report.md'}")

    # accuracy: the trainer's own final evaluation of that checkpoint, exactly.
    accuracy = json.loads((out / "accuracy" / "accuracy.json").read_text())
    keys = [f"{split}/{field}" for split in ("validation", "test") for field in ("accuracy",
            "examples")]  # fmt: skip
    assert accuracy == {key: summary[key] for key in keys}
    assert accuracy["test/examples"] == 364 and accuracy["validation/examples"] == 180

    # fewshot: what the evaluator returns for the same run and options.
    fewshot = json.loads((out / "fewshot" / "fewshot.json").read_text())
    api = evaluators.get_evaluator("fewshot", shots=(1, 2), seeds=(0,)).evaluate(trained_run)
    assert fewshot == api

    # sweep: the requested grid, capacities ceil(K * C * S / E) with S = 10 tokens, E = 4, by
    # hand; the CSV holds the JSON's numbers.
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [(r["router"], r["k"], r["capacity_factor"]) for r in sweep] == [
        ("top_k", 1, 0.25), ("top_k", 1, 1.0), ("bpr", 1, 0.25), ("bpr", 1, 1.0)
    ]  # fmt: skip
    for r in sweep:
        assert r["examples"] == 364 and r["split"] == "test" and r["group_size"] == 10
        assert r["capacity"] == {0.25: 1, 1.0: 3}[r["capacity_factor"]]
        assert r["moe_flops_relative"] == pytest.approx(r["capacity"] / 5)  # K=2, C=1: 5 slots
        # K=1: a token has no expert exactly when its one choice was dropped.
        assert r["no_expert_fraction"] == pytest.approx(1 - r["processed_fraction"], abs=1e-12)
        assert r["accuracy"] * 364 == pytest.approx(round(r["accuracy"] * 364), abs=1e-9)
    with (out / "sweep" / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["router"], float(row["accuracy"])) for row in rows] == [
        (r["router"], r["accuracy"]) for r in sweep
    ]

    # routing: at the model's own K=2 and capacity factor 1.05: ceil(2 * 1.05 * 10 / 4) = 6
    # slots; every count adds up to the test split's 364 images of 5 tokens.
    routing = json.loads((out / "routing" / "routing.json").read_text())
    assert (routing["k"], routing["capacity"], routing["examples"]) == (2, 6, 364)
    layer = routing["layers"]["moe_block_1"]
    counts, positions = np.array(layer["counts"]), np.array(layer["position_counts"])
    assert (layer["tokens"], layer["choices"]) == (364 * 5, 364 * 5 * 2)
    assert layer["selected"] == counts.sum() == positions.sum()
    assert layer["selected"] + layer["dropped"] == layer["choices"]
    assert 2 * layer["no_expert_tokens"] <= layer["dropped"]
    per_class = np.bincount(trained_run.dataset.labels("test"), minlength=10)
    assert np.all(counts.sum(0) <= 5 * 2 * per_class)  # K choices of each token of the class
    assert np.all(positions.sum(0) <= 2 * 364)  # K choices of each image's token p

    # report: the JSONs' numbers (4 decimals) and the routing table.
    report = (out / "report.md").read_text()
    rows = dict(re.findall(r"^\| (\S+/\S+) \| (\d+\.\d{4}) \|$", report, flags=re.MULTILINE))
    assert rows == {k: f"{v:.4f}" for k, v in {**accuracy, **fewshot}.items()}
    assert json.loads((out / "report.json").read_text()) == {
        "accuracy": accuracy,
        "fewshot": fewshot,
    }
    table = (out / "routing" / "routing.md").read_text().split("\n\n", 2)[2].strip()
    assert table.startswith("| layer |") and table in report
    assert "![sweep](sweep/sweep.png)" in report


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
