"""Built-in callbacks (progress bar, JSONL, TensorBoard, profiler) and the callback registry."""

from __future__ import annotations

import ast
import json
import pathlib

import ml_collections
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import vmoe_plugins
from vmoe_train import callbacks as cb

BUILTINS = ("jsonl", "profile", "progress", "tensorboard")


def make_run(tmp_path, *, start_step=0, num_steps=10, main=True, **log):
    config = ml_collections.ConfigDict({"batch_size": 8, "log": {"every_steps": 5, **log}})
    return cb.RunInfo(tmp_path, config, start_step, num_steps, is_main_process=main)


def drive(callbacks, run):
    """What the training loop does: steps 5 and 10 logged, one eval, a checkpoint, the end."""
    for callback in callbacks:
        callback.on_train_start(run)
    for step, loss in ((5, 0.75), (10, 0.5)):
        metrics = {"train/loss": loss, "train/learning_rate": 1e-3, "train/images_per_second": 64.0}
        for callback in callbacks:
            callback.on_step_end(step, metrics)
    for callback in callbacks:
        callback.on_eval(10, {"validation/accuracy": 0.875, "validation/loss": 0.4})
        callback.on_checkpoint(10, pathlib.Path(run.workdir) / "checkpoints" / "10")
        callback.on_train_end({"steps": 10, "validation/accuracy": 0.875})


def test_builtins_are_registered_through_the_hook():
    assert set(BUILTINS) <= set(cb.available_callbacks())
    for name in BUILTINS:
        assert cb.CALLBACKS.provider(name) == "vmoe_train.builtins (built-in)"
    cb.register()  # idempotent
    assert set(BUILTINS) <= set(cb.available_callbacks())


def test_jsonl_logger_writes_train_metrics_eval_results_and_a_summary(tmp_path):
    run = make_run(tmp_path)
    drive(cb.make_callbacks(("jsonl",), run), run)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("step") for line in lines] == [5, 10, 10, None]
    assert [line.get("train/loss") for line in lines[:2]] == [0.75, 0.5]
    assert lines[2]["validation/accuracy"] == 0.875
    assert lines[3]["summary"] == {"steps": 10, "validation/accuracy": 0.875}


def test_tensorboard_logger_writes_train_and_eval_scalars(tmp_path):
    run = make_run(tmp_path)
    drive(cb.make_callbacks(("tensorboard",), run), run)
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    loss = accumulator.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(5, 0.75), (10, 0.5)]
    [accuracy] = accumulator.Scalars("validation/accuracy")
    assert (accuracy.step, accuracy.value) == (10, 0.875)


def test_progress_bar_shows_steps_loss_and_eval_on_stderr(tmp_path, capsys):
    run = make_run(tmp_path)
    drive(cb.make_callbacks(("progress",), run), run)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "10/10" in captured.err
    assert "loss=0.5" in captured.err
    assert "images/s=64.0" in captured.err
    assert "lr=0.001" in captured.err
    assert "step 10: validation/accuracy=0.875, validation/loss=0.4" in captured.err


def test_progress_bar_measures_images_per_second_when_the_loop_does_not(tmp_path, capsys):
    run = make_run(tmp_path, start_step=4)
    [bar] = cb.make_callbacks(("progress",), run)
    assert bar.batch_size == 8  # from config.batch_size
    bar.on_train_start(run)
    bar.on_step_end(5, {"train/loss": 1.0})
    bar.on_step_end(10, {"train/loss": 0.5})
    bar.on_train_end({})
    err = capsys.readouterr().err
    assert "4/10" in err  # resumed: starts at the restored step
    assert "10/10" in err
    assert "images/s=" in err


def test_nothing_is_written_outside_the_main_process(tmp_path, capsys):
    run = make_run(tmp_path, main=False, profile_steps=(0, 5))
    callbacks = cb.make_callbacks(BUILTINS, run)
    drive(callbacks, run)
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")


def test_profiler_traces_its_window(tmp_path):
    run = make_run(tmp_path)
    profiler = cb.Profiler(start_step=2, num_steps=2)
    profiler.on_train_start(run)
    seen = []
    for step in range(1, 7):
        profiler.on_step_end(step, {})
        seen.append(profiler.tracing)
    profiler.on_train_end({})
    assert seen == [False, True, True, False, False, False]  # started after step 2, stopped at 4
    traces = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1


def test_profiler_is_off_without_profile_steps_and_skips_a_window_already_past(tmp_path):
    run = make_run(tmp_path, start_step=8)
    assert cb.Profiler.from_run(run).num_steps == 0
    past = cb.Profiler(2, 3)
    past.on_train_start(run)
    past.on_step_end(10, {})
    past.on_train_end({})
    assert not past.tracing
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize(
    ("profile_steps", "window"),
    [(0, (0, 0)), ((), (0, 0)), (5, (4, 5)), ((20, 3), (20, 3)), ([7, 1], (7, 1))],
)
def test_profiler_window_from_config(tmp_path, profile_steps, window):
    profiler = cb.Profiler.from_run(make_run(tmp_path, start_step=3, profile_steps=profile_steps))
    assert (profiler.start_step, profiler.num_steps) == window


@pytest.mark.parametrize("profile_steps", ["10", (1, 2, 3), -1, (1, -2)])
def test_profiler_refuses_a_bad_window(tmp_path, profile_steps):
    with pytest.raises(ValueError, match=r"profile_steps|num_steps"):
        cb.Profiler.from_run(make_run(tmp_path, profile_steps=profile_steps))


class Recorder(cb.Callback):
    def __init__(self, run):
        self.run = run
        self.calls = []

    def on_step_end(self, step, metrics):
        self.calls.append((step, metrics["train/loss"]))


def broken_factory(run):
    raise OSError("no disk")


class RecorderPlugin:
    @vmoe_plugins.hookimpl
    def vmoe_train_callbacks(self):
        return {
            "recorder": Recorder,
            "not_a_callback": lambda run: object(),
            "broken": broken_factory,
        }


@pytest.fixture
def recorder_plugin():
    name = vmoe_plugins.register_plugin(RecorderPlugin(), name="test-recorder")
    yield name
    vmoe_plugins.unregister_plugin(name)


def test_a_plugin_callback_is_listed_and_built(tmp_path, recorder_plugin):
    assert "recorder" in cb.available_callbacks()
    assert cb.CALLBACKS.provider("recorder") == recorder_plugin
    run = make_run(tmp_path)
    recorder, jsonl = cb.make_callbacks(["recorder", "jsonl"], run)
    assert isinstance(jsonl, cb.JsonlLogger)
    drive([recorder, jsonl], run)
    assert recorder.run is run
    assert recorder.calls == [(5, 0.75), (10, 0.5)]


def test_a_plugin_factory_that_returns_no_callback_is_refused(tmp_path, recorder_plugin):
    with pytest.raises(ValueError, match=r"'not_a_callback' from test-recorder .*on_train_start"):
        cb.make_callbacks(("not_a_callback",), make_run(tmp_path))


def test_a_factory_error_says_which_callback_it_was_building(tmp_path, recorder_plugin):
    with pytest.raises(OSError, match="no disk") as error:
        cb.make_callbacks(("broken",), make_run(tmp_path))
    assert error.value.__notes__ == ["while building callback 'broken' from test-recorder"]


def test_an_unknown_callback_lists_the_installed_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown callback 'progres'") as error:
        cb.make_callbacks(("jsonl", "progres"), make_run(tmp_path))
    message = str(error.value)
    assert "did you mean 'progress'" in message
    assert all(repr(name) in message for name in BUILTINS)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing built before every name is known


def test_callback_names_must_be_a_tuple_of_distinct_names(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(ValueError, match=r"not the string 'progress'; e.g. \('progress',\)"):
        cb.make_callbacks("progress", run)
    with pytest.raises(ValueError, match=r"\['jsonl'\] are named more than once"):
        cb.make_callbacks(("jsonl", "progress", "jsonl"), run)
    assert cb.make_callbacks((), run) == []


def test_profiler_at_the_trainers_cadence_traces_a_window_shorter_than_it(tmp_path, monkeypatch):
    # log.profile_steps=5 with log.every_steps=25 (the defaults): steps arrive at 25, 50, ...
    calls = []
    monkeypatch.setattr("jax.profiler.start_trace", lambda d: calls.append(("start", d)))
    monkeypatch.setattr("jax.profiler.stop_trace", lambda: calls.append(("stop",)))
    run = make_run(tmp_path, num_steps=100, profile_steps=5)
    profiler = cb.Profiler.from_run(run)
    profiler.on_train_start(run)
    for step in (25, 50, 75, 100):
        profiler.on_step_end(step, {})
        calls.append(("tracing" if profiler.tracing else "idle", step))
    profiler.on_train_end({})
    assert calls == [
        ("start", str(tmp_path / "profile")),
        ("tracing", 25),
        ("stop",),
        ("idle", 50),
        ("idle", 75),
        ("idle", 100),
    ]


def test_builtins_close_on_abort(tmp_path):
    run = make_run(tmp_path, num_steps=10)
    jsonl, board = cb.JsonlLogger(), cb.TensorBoardLogger()
    for callback in (jsonl, board):
        callback.on_train_start(run)
        callback.on_step_end(1, {"train/loss": 1.0})
        callback.on_train_abort(KeyboardInterrupt())
        callback.on_train_abort(KeyboardInterrupt())  # idempotent
    assert jsonl._writer is None and board._writer is None
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["train/loss"] == 1.0


def _module_level_imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:  # top-level statements only
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_callbacks_and_config_do_not_import_each_other_at_import_time():
    # Config validation reads the installed callback names (log.callbacks) when it runs; the
    # callbacks read config fields with config_get when a run builds them. Neither at import.
    source = pathlib.Path(cb.__file__)
    assert not {n for n in _module_level_imports(source) if n.startswith("vmoe_train.config")}
    for path in (source.parent / "config").glob("*.py"):
        imported = _module_level_imports(path)
        assert not {n for n in imported if n.startswith("vmoe_train.callbacks")}, path.name


def test_eval_evaluators_add_the_evaluators_callback_once():
    def config(callbacks, evaluators):
        return ml_collections.ConfigDict(
            {"log": {"callbacks": callbacks}, "eval": {"evaluators": evaluators}}
        )

    assert cb.callback_names(config(("jsonl",), ())) == ("jsonl",)
    assert cb.callback_names(config(("jsonl",), ("accuracy",))) == ("jsonl", "evaluators")
    assert cb.callback_names(config((), ("accuracy",))) == ("evaluators",)
    named = config(("evaluators", "jsonl"), ("accuracy",))
    assert cb.callback_names(named) == ("evaluators", "jsonl")  # not twice
    # A config saved before eval.evaluators existed.
    assert cb.callback_names(ml_collections.ConfigDict({"log": {"callbacks": ("jsonl",)}})) == (
        "jsonl",
    )
