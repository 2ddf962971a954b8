"""The `vmoe-train` command: parsing, --list-configs, --check, and handing over to the trainer.

No training here: `vmoe_train.trainer` is replaced by a fake that records its call.
"""

from __future__ import annotations

import re
import subprocess
import sys
import types

import pytest

from vmoe_train import cli
from vmoe_train.config import DEFAULT_CONFIG, config_to_json, load_config, shipped_configs


@pytest.fixture
def trainer(monkeypatch):
    """A fake `vmoe_train.trainer` whose `train` records (config, workdir)."""
    calls = []

    def train(config, workdir):
        calls.append((config, workdir))
        return {"steps": 0}

    module = types.ModuleType("vmoe_train.trainer")
    module.train = train
    module.calls = calls
    monkeypatch.setitem(sys.modules, "vmoe_train.trainer", module)
    monkeypatch.setattr(cli, "_tune_cpu_malloc", lambda: None)  # no process-wide change
    return module


def test_list_configs(capsys):
    assert cli.main(["--list-configs"]) == 0
    out = capsys.readouterr().out
    for name, line in shipped_configs().items():
        assert re.search(rf"^{name}\s+{re.escape(line)}$", out, re.MULTILINE), out
    assert "base" not in out.split()


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vmoe-train") and "--config.FIELD=VALUE" in out
    # Every flag the parser takes has its own line under "options:", and the default named
    # there is the one a run without --config loads.
    options = out.split("\noptions:\n", 1)[1]
    for flag in cli.FLAGS:
        assert re.search(rf"^  (-h, )?{re.escape(flag)}\b", options, re.MULTILINE), flag
    assert f"(default: {DEFAULT_CONFIG})" in options


def test_check_ok(capsys):
    import jax

    assert cli.main(["--check", "--config=digits_vit"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"OK ({jax.device_count()} device(s), 1 process(es))\n"
    assert captured.err == ""


def test_check_reports_a_bad_override_with_status_2(capsys):
    status = cli.main(["--check", "--config.model.moe.router_options.k=5"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert "model.moe.router_options.k=5: must be <= model.moe.num_experts=4" in captured.err
    assert "Traceback" not in captured.err


def test_every_problem_is_printed(capsys):
    argv = ["--check", "--config.batch_size=0", "--config.optimizer.name", "adamx"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("2 problems in the config:")
    assert "batch_size=0" in err and "optimizer.name='adamx'" in err


def test_unknown_override_field_is_a_config_error(capsys):
    assert cli.main(["--check", "--config.model.moe.ruoter=bpr"]) == 2
    assert "did you mean 'router'?" in capsys.readouterr().err


def test_unknown_config_name(capsys):
    assert cli.main(["--check", "--config=digits_vmo"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'digits_vmoe'?" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--confg=digits_vmoe"], "did you mean --config?"),
        (["--workdir"], "--workdir needs a value"),
        (["--config.num_steps"], "--config.num_steps needs a value"),
        (["--config.=3"], "name a field"),
        (["train"], "unknown argument 'train'"),
    ],
)
def test_usage_errors(capsys, argv, message, trainer):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert trainer.calls == []


def test_a_run_calls_the_trainer_with_the_overridden_config(capsys, tmp_path, trainer):
    workdir = str(tmp_path / "run")
    argv = [
        "--config=digits_vmoe",
        "--config.model.moe.router=bpr",
        "--config.model.moe.router_options.k=1",
        "--config.model.moe.router_options.priority_score",  # a new option, value apart
        "sum",
        "--config.num_steps",
        "500",
        f"--workdir={workdir}",
    ]
    assert cli.main(argv) == 0
    ((config, given_workdir),) = trainer.calls
    assert given_workdir == workdir
    assert config.model.moe.router == "bpr" and config.num_steps == 500
    assert config.model.moe.router_options.to_dict() == {
        "k": 1,
        "priority_score": "sum",
    }
    # Nothing else changed: the shipped config with those four fields set by hand.
    expected = load_config("digits_vmoe")
    expected.model.moe.router = "bpr"
    expected.model.moe.router_options.k = 1
    expected.model.moe.router_options.priority_score = "sum"
    expected.num_steps = 500
    assert config_to_json(config) == config_to_json(expected)
    assert capsys.readouterr().out == ""  # the trainer prints the summary


def test_default_workdir_names_the_config_and_the_time(trainer):
    assert cli.main(["--config=digits_vit"]) == 0
    ((config, workdir),) = trainer.calls
    assert config.model.name == "ViT-Mu/2"
    assert re.fullmatch(r"runs[/\\]digits_vit-\d{8}-\d{6}", workdir), workdir


def test_a_config_file_by_path(tmp_path, trainer):
    path = tmp_path / "my_run.py"
    lines = [
        "from vmoe_train.configs.digits_vmoe import get_config as base",
        "def get_config():",
        "    c = base()",
        "    c.num_steps = 10",
        "    c.optimizer.warmup_steps = 2",
        "    return c",
    ]
    path.write_text("\n".join(lines) + "\n")
    assert cli.main([f"--config={path}"]) == 0
    ((config, workdir),) = trainer.calls
    expected = load_config("digits_vmoe")
    expected.num_steps, expected.optimizer.warmup_steps = 10, 2
    assert config_to_json(config) == config_to_json(expected)
    assert re.fullmatch(r"runs[/\\]my_run-\d{8}-\d{6}", workdir), workdir


def test_a_bad_config_never_reaches_the_trainer(capsys, trainer):
    assert cli.main(["--config.optimizer.warmup_steps=9000", "--workdir=unused"]) == 2
    assert "optimizer.warmup_steps=9000: must be <= num_steps=6000" in capsys.readouterr().err
    assert trainer.calls == []


def test_a_multi_process_run_needs_a_workdir(capsys, trainer):
    argv = ["--config.distributed.num_processes=2", "--config.distributed.process_id=1"]
    assert cli.main(argv) == 2
    assert "--workdir" in capsys.readouterr().err
    assert trainer.calls == []


def test_a_distributed_run_leaves_the_devices_to_the_trainer(monkeypatch, tmp_path, trainer):
    seen = []
    monkeypatch.setattr(cli, "check_config", lambda config, **kwargs: seen.append(kwargs) or config)
    argv = [
        "--config.distributed.coordinator_address=localhost:1234",
        "--config.distributed.num_processes=2",
        f"--workdir={tmp_path}",
    ]
    assert cli.main(argv) == 0
    assert seen == [{"num_processes": 2}]  # devices: after jax.distributed.initialize
    ((config, workdir),) = trainer.calls
    assert workdir == str(tmp_path)
    assert config.distributed.to_dict() == {
        "coordinator_address": "localhost:1234",
        "num_processes": 2,
        "process_id": 0,
    }


def test_python_dash_m(data_dir, capsys):
    result = subprocess.run(
        [sys.executable, "-m", "vmoe_train", "--list-configs"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The same listing as the command in this process.
    assert cli.main(["--list-configs"]) == 0
    assert result.stdout == capsys.readouterr().out
    assert re.search(r"^digits_vmoe\s", result.stdout, re.MULTILINE)
