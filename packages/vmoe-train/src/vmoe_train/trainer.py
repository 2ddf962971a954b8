"""The training loop: a config in; a trained, evaluated and checkpointed model out.

    summary = train(config, workdir)

1. Validate the config against this machine (every problem at once, before compiling).
2. Build the parts from their packages (`setup.build`): dataset and pipelines (vmoe-data), model
   and sharding strategy (vmoe-layers, routers from vmoe-routing), optimizer (optax), steps
   (`steps.py`); then the checkpointer (orbax, `checkpoints.py`) and callbacks (plugins,
   `callbacks.py`).
3. Start: resume from the latest complete checkpoint in `workdir` if there is one (state and the
   data iterator's position), else fine-tune from `finetune.init_from`, else initialise.
4. Loop to `num_steps`: train step; log every `log.every_steps`; evaluate every
   `eval.every_steps`; checkpoint every `checkpoint.every_steps`.
5. Finish: evaluate the eval splits and the test split, save the last checkpoint, print and
   return the summary (also `workdir/summary.json`).

Each process reads its own shard of the data; batches become global arrays laid out by the
strategy (`jax.make_array_from_process_local_data`), so one code path serves one device, many
devices and many processes.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
from flax import traverse_util

import vmoe_data
import vmoe_layers as vl
from vmoe_train import checkpoints, finetune, init_from, resume, steps
from vmoe_train import config as config_lib
from vmoe_train.callbacks import Callback, RunInfo, callback_names, make_callbacks
from vmoe_train.configs.base import base_config
from vmoe_train.setup import Setup, build, data_cache
from vmoe_train.setup import tokens_per_image as tokens_per_image


def initialize_distributed(cfg: Any) -> None:
    """`jax.distributed.initialize` when the config names a coordinator ("auto": the cluster
    environment's, e.g. SLURM). Must run before anything touches jax's backends."""
    if not cfg.coordinator_address or jax.distributed.is_initialized():
        return
    # Cross-process collectives of CPU devices need gloo; the setting only concerns CPU
    # devices, so it is harmless on accelerator hosts (and asking which backend is in use
    # here would initialise the backends too early).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.coordinator_address == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id
        )


def evaluate(setup: Setup, variables: Any, split: str) -> dict[str, float]:
    """Accuracy and mean loss of the model's `variables` (`TrainState.variables()`: params, and
    router state where the routers keep one) on every example of `split` (padding masked)."""
    totals: dict[str, float] = {}
    for batch in setup.eval_batches(split):
        sums = jax.device_get(setup.eval_step(variables, setup.to_global(batch)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = max(totals.get("count", 0.0), 1.0)
    results = {
        f"{split}/accuracy": totals["correct"] / count,
        f"{split}/loss": totals["loss_sum"] / count,
        f"{split}/examples": totals["count"],
    }
    if setup.eval_capacity is not None:  # which routing the figures are for
        results[f"{split}/capacity_factor"] = setup.eval_capacity
    return results


def initial_state(setup: Setup, ckpt: checkpoints.Checkpointer):
    """(state, data iterator state or None, step, how) from a checkpoint, a fine-tuning
    source, or a fresh initialisation, in that order.

    A checkpoint is restored into the abstract state (shapes and shardings, nothing allocated;
    each process reads only its shards) after its config is checked against this run's
    (`resume.check_resume`: a change of trajectory is refused unless `resume.allow_changes`
    names it)."""
    config = setup.config
    if ckpt.steps():
        # The config first (a small JSON read): a changed model must be refused by name, not
        # fail as a state that does not fit.
        notes = resume.check_resume(
            checkpoints.read_config(ckpt.directory),
            config_lib.config_to_json(config),
            allow=tuple(config.resume.allow_changes),
            defaults=config_lib.config_to_json(base_config()),
            where=f"the latest checkpoint in {ckpt.directory}",
        )
        abstract = steps.abstract_train_state(
            setup.model, setup.optimizer, setup.sample_images, setup.strategy
        )
        restored = ckpt.restore(abstract)
        how = f"resumed from {restored.path}"
        if notes:
            how += " with changed settings: " + "; ".join(notes)
        return restored.state, restored.data_state, restored.step, how
    if config.finetune.init_from and (
        init_from.uses_rules(config.finetune) or init_from.is_npz(config.finetune.init_from)
    ):
        # Rules (upcycling) or a vit_jax file: the source is read whole on the host and mapped.
        init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
        model = steps.init_model(setup.model)
        fresh = vl.init_sharded(setup.strategy, model, init_rng, setup.sample_images)
        step = None if config.finetune.step < 0 else int(config.finetune.step)
        source_name = config.finetune.init_from
        source = init_from.read_source(source_name, step)
        if init_from.uses_rules(config.finetune):
            rules, keep_fresh, unmatched = init_from.rules_of(
                config.finetune, setup.model.moe_blocks(), fresh
            )
            params = init_from.params_by_rules(
                fresh,
                source,
                rules,
                keep_fresh=keep_fresh,
                unmatched=unmatched,
                expert_noise=float(config_lib.config_get(config, "finetune.upcycle_noise", 0.0)),
                seed=int(config.seed),
            )
        else:
            params = finetune.finetune_params(
                fresh,
                traverse_util.unflatten_dict(source, sep="/"),
                new_head=bool(config.finetune.new_head),
                has_class_token=setup.model.classifier == "token",
            )
        # Sources mapped by rules (dense models, vit_jax files) have no router state: fresh.
        router_state = vl.init_router_state(setup.strategy, model, setup.sample_images)
        state = steps.state_from_params(params, setup.optimizer, train_rng, router_state)
        upcycled = config_lib.config_get(config, "finetune.upcycle", False)
        return state, None, 0, f"{'upcycled' if upcycled else 'fine-tuning'} from {source_name}"
    if config.finetune.init_from:
        source = checkpoints.locate(config.finetune.init_from)
        step = source.step if config.finetune.step < 0 else int(config.finetune.step)
        init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
        model = steps.init_model(setup.model)
        fresh = vl.init_sharded(setup.strategy, model, init_rng, setup.sample_images)
        new_head = bool(config.finetune.new_head)
        loaded, read_step = checkpoints.restore_params(
            source.directory,
            finetune.restore_target(fresh, new_head=new_head),
            step=step,
            with_step=True,
        )
        params = finetune.finetune_params(
            fresh,
            loaded,
            new_head=new_head,
            has_class_token=setup.model.classifier == "token",
        )
        router_state = finetune_router_state(setup, source.directory, read_step)
        state = steps.state_from_params(params, setup.optimizer, train_rng, router_state)
        return state, None, 0, f"fine-tuning from {source.directory}"
    fresh = steps.create_train_state(
        setup.model, setup.optimizer, config.seed, setup.sample_images, setup.strategy
    )
    return fresh, None, 0, "initialised from scratch"


def finetune_router_state(setup: Setup, directory: pathlib.Path, step: int) -> Any:
    """The router state a fine-tuning run starts with: the source checkpoint's where it has one
    of the same structure and shapes (a balancing bias goes with the router weights it was
    learned with: zeroing it would bring back the imbalance it corrected), else a fresh one
    ({} for stateless routers)."""
    fresh = vl.init_router_state(setup.strategy, steps.init_model(setup.model), setup.sample_images)
    if not fresh:
        return {}

    def same_as_fresh(saved: Any) -> Any:  # read into fresh's layout, or not at all
        shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), x.dtype), tree)  # noqa: E731
        if jax.tree.structure(saved) != jax.tree.structure(fresh) or shapes(saved) != shapes(fresh):
            return {}
        return checkpoints.abstract_like(fresh)

    saved = checkpoints.restore_router_state(directory, step, same_as_fresh)
    return saved or fresh


def train(
    config: Any, workdir: str | pathlib.Path, *, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Trains and evaluates the config's model in `workdir` (resuming if it holds checkpoints).

    Returns the summary: final accuracies and losses, steps, time, images/s, checkpoint path.
    """
    workdir = pathlib.Path(workdir)
    initialize_distributed(config.distributed)
    config_lib.check_config(
        config, num_devices=jax.device_count(), num_processes=jax.process_count()
    )
    main_process = jax.process_index() == 0
    if main_process:
        workdir.mkdir(parents=True, exist_ok=True)
    setup = build(config)
    ckpt = checkpoints.Checkpointer(
        workdir / "checkpoints",
        every_steps=int(config.checkpoint.every_steps),
        keep=int(config.checkpoint.keep),
        keep_best=config.checkpoint.keep_best,
        best_mode=config.checkpoint.keep_best_mode,
        async_save=bool(config.checkpoint.async_save),
    )
    listeners: list[Callback] = []
    try:
        summary = _run(setup, ckpt, workdir, listeners, callbacks)
    except BaseException as error:
        # A crash (or Ctrl-C) still closes what the callbacks opened (logs flushed, a trace
        # stopped, the progress bar closed) and lets a pending checkpoint write finish.
        for listener in listeners:
            try:
                listener.on_train_abort(error)
            except Exception as failure:  # the first error is the one to report
                error.add_note(f"and closing callback {listener!r} failed: {failure!r}")
        raise
    finally:
        ckpt.close()
    if main_process:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary), flush=True)
    return summary


def _run(
    setup: Setup,
    ckpt: checkpoints.Checkpointer,
    workdir: pathlib.Path,
    listeners: list[Callback],
    extra_callbacks: Sequence[Callback],
) -> dict[str, Any]:
    """`train`'s loop; `listeners` is filled with the callbacks as they are built."""
    config = setup.config
    main_process = jax.process_index() == 0
    state, data_state, start, how = initial_state(setup, ckpt)
    train_iter = iter(
        vmoe_data.train_pipeline(
            setup.dataset,
            split=config.dataset.train_split,
            batch_size=config.batch_size,
            pp=config.pp.train,
            seed=config.seed,
            num_workers=config.dataset.num_workers,
            cache=data_cache(config),
        )
    )
    if data_state:
        train_iter.set_state(data_state)
    num_steps = setup.num_steps
    run = RunInfo(workdir, config, start, num_steps, main_process)
    if main_process:
        print(f"vmoe-train: {config.model.name} on {config.dataset.name}, {how}", flush=True)
    listeners += [*make_callbacks(callback_names(config), run), *extra_callbacks]
    for listener in listeners:
        listener.on_train_start(run)

    config_json = config_lib.config_to_json(config)
    log_every, eval_every = int(config.log.every_steps), int(config.eval.every_steps)
    # keep_best chooses among checkpoints by their own step's metrics: every checkpoint step
    # is evaluated then, whatever eval.every_steps is.
    eval_at_checkpoints = bool(config.checkpoint.keep_best)
    started = time.perf_counter()
    window_start, window_images = started, 0
    images_per_second = 0.0
    for step in range(start + 1, num_steps + 1):
        batch = next(train_iter)
        state, metrics = setup.train_step(state, setup.to_global(batch))
        window_images += config.batch_size
        if step % log_every == 0 or step == num_steps:
            values = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            images_per_second = window_images / max(now - window_start, 1e-9)
            window_start, window_images = now, 0
            values["train/learning_rate"] = float(setup.schedule(step - 1))
            values["train/images_per_second"] = images_per_second
            for listener in listeners:
                listener.on_step_end(step, values)
        if step == num_steps:
            break
        save = ckpt.should_save(step)
        step_eval = None
        if (eval_every and step % eval_every == 0) or (save and eval_at_checkpoints):
            step_eval = _evaluate_all(setup, state.variables(), config.dataset.eval_splits)
            for listener in listeners:
                listener.on_evaluate(step, state.variables(), setup)
            for listener in listeners:
                listener.on_eval(step, step_eval)
        if save:
            data = train_iter.get_state()
            path = ckpt.save(step, state, data_state=data, config=config_json, metrics=step_eval)
            if path is not None:
                for listener in listeners:
                    listener.on_checkpoint(step, path)

    final = _evaluate_all(setup, state.variables(), config.dataset.eval_splits)
    if config.dataset.test_split:
        final.update(evaluate(setup, state.variables(), config.dataset.test_split))
    for listener in listeners:
        listener.on_evaluate(num_steps, state.variables(), setup)
    for listener in listeners:
        listener.on_eval(num_steps, final)
    path = ckpt.save(
        num_steps,
        state,
        data_state=train_iter.get_state(),
        config=config_json,
        metrics=final,
        force=True,
    )
    ckpt.wait()
    if path is None and num_steps in ckpt.steps():  # resumed at the end: it is already saved
        path = workdir / "checkpoints" / str(num_steps)
    if path is not None:
        for listener in listeners:
            listener.on_checkpoint(num_steps, path)
    summary = {
        "workdir": str(workdir),
        "checkpoint": str(path) if path is not None else None,
        "steps": num_steps,
        "start_step": start,
        "seconds": time.perf_counter() - started,
        "train/images_per_second": images_per_second,
        **final,
    }
    for listener in listeners:  # first: the progress bar closes before the summary prints
        listener.on_train_end(summary)
    return summary


def _evaluate_all(setup: Setup, variables: Any, splits: Sequence[str]) -> dict[str, float]:
    results: dict[str, float] = {}
    for split in splits:
        results.update(evaluate(setup, variables, split))
    return results


def format_summary(summary: dict[str, Any]) -> str:
    minutes, seconds = divmod(round(summary["seconds"]), 60)
    lines = [
        f"vmoe-train: done, {summary['steps']} steps in {minutes}m{seconds:02d}s "
        f"({summary['train/images_per_second']:.0f} images/s at the end)"
    ]
    for key in sorted(k for k in summary if k.endswith("/accuracy")):
        capacity = summary.get(key.replace("/accuracy", "/capacity_factor"))
        at = f" (capacity factor {capacity:g})" if capacity is not None else ""
        lines.append(f"  {key}: {100 * summary[key]:.2f}%{at}")
    lines.append(f"  run: {summary['workdir']}")
    lines.append(f"  checkpoint: {summary['checkpoint']}")
    report = pathlib.Path(summary["workdir"]) / "eval" / "report.md"
    lines.append(
        f"  more: vmoe-eval all {summary['workdir']}  (few-shot, capacity and K sweep, routing "
        f"analysis; report: {report})"
    )
    return "\n".join(lines)
