"""reproduce/run.py end to end on a user's image folder, every claim, by the one `--dataset`
flag: 21 trainings of 10 steps or fewer, one seed (about 8 minutes on 2 cores, so it runs in
`nox -s reproduce-smoke`, not in the default run; the default run validates every experiment's
config on an image folder in test_reproduce_settings.py)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[2]

pytestmark = pytest.mark.skipif(
    os.environ.get("VMOE_REPRODUCE_SMOKE") != "1",
    reason="runs in `nox -s reproduce-smoke` (VMOE_REPRODUCE_SMOKE=1)",
)


def test_every_claim_runs_on_an_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 12)):
        for c in range(4):  # learnable: the class sets the mean colour
            folder = tmp_path / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.normal(60 * c + 30, 40, (20 + i % 3, 20, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "results"
    command = [
        sys.executable,
        str(ROOT / "reproduce" / "run.py"),
        f"--dataset=image_folder:{tmp_path / 'images'}",
        "--image-size=16",
        "--steps=10",
        "--seeds=0",
        f"--runs={tmp_path / 'runs'}",
        f"--out={out}",
        "--override=optimizer.warmup_steps=2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for claim in ("**a.", "**b.", "**c.", "**d.", "**e.", "**f.", "**g.", "**h. Bal", "**h. Gra"):
        assert claim in summary
    assert "from classes 0,1 to classes 2,3" in summary  # halves of the folder's 4 classes
    assert len(list((out / "runs").glob("*-seed0.json"))) == 21
    names = ("a_bpr", "b_dense", "c_routing", "d_k", "e_transfer", "f_aux", "g_upcycle")
    for name in (*names, "h_balance", "h_granularity"):
        assert (out / f"{name}.png").stat().st_size > 0
    finetuned = json.loads((out / "runs" / "vmoe_finetuned-seed0.json").read_text())
    assert "dataset.name=image_folder:" in " ".join(finetuned["settings"])
    assert finetuned["classes"] == [2, 3] and finetuned["steps"] == 2  # round(10 * 0.25)
    upcycled = json.loads((out / "runs" / "vmoe_upcycled-seed0.json").read_text())
    assert "finetune.upcycle=True" in upcycled["settings"]
    assert (
        f"finetune.init_from={tmp_path / 'runs' / 'vit_upcycle_source' / 'seed0'}"
        in (upcycled["settings"])
    )
    assert upcycled["model"] == "V-MoE-Mu/2" and upcycled["steps"] == 5  # round(10 * 0.5)
