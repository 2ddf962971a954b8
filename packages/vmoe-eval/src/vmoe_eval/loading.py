"""A trained run, loaded for evaluation: its config, model, dataset and parameters.

    run = load_run("runs/digits")                  # a run dir, its checkpoints/ or a step dir
    for out, batch in forward(run, "test", k=1, capacity_factor=0.5, router="bpr"):
        ...                                          # ModelOutput of each padded batch, its mask

Everything is rebuilt from the config saved in the checkpoint, with the same builders the trainer
uses (vmoe_train.setup), so evaluation sees exactly the trained model. Inference-time changes (K,
the capacity factor, vanilla vs BPR filling) swap the routers' settings; parameters never change.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import traverse_util

import vmoe_data
import vmoe_layers as vl
from vmoe_train import checkpoints, steps
from vmoe_train import config as config_lib
from vmoe_train import setup as setup_lib
from vmoe_train.mismatch import check_fit
from vmoe_train.state import model_variables


@dataclasses.dataclass
class LoadedRun:
    """Attributes:
    path: the checkpoint directory the parameters came from (`.../checkpoints`); for a run
      built around the trainer's live parameters (`evaluators.EvalCallback`), the run's
      checkpoint directory, which need not hold this step.
    step: the step of those parameters.
    config: the run's config (as saved with the checkpoint, or the trainer's).
    setup: the trainer's parts for that config (model, dataset, strategy, `to_global`).
    params: the parameters, laid out by the strategy.
    router_state: the routers' state (e.g. an aux-loss-free router's balancing bias), replicated;
      {} where the routers keep none.
    """

    path: pathlib.Path
    step: int
    config: Any
    setup: setup_lib.Setup
    params: Any
    router_state: Any = dataclasses.field(default_factory=dict)

    @property
    def variables(self) -> dict[str, Any]:
        """What `model.apply` takes: the params, and the router state where there is one."""
        return model_variables(self.params, self.router_state)

    @property
    def model(self) -> vl.VisionTransformer:
        return self.setup.model

    @property
    def dataset(self) -> vmoe_data.Dataset:
        return self.setup.dataset


def load_run(
    path: str | pathlib.Path, step: int | None = None, *, overrides: Any = ()
) -> LoadedRun:
    """The run at `path` (a run dir, its checkpoints/ or one step dir: `checkpoints.locate`),
    at `step` (default: the step dir's, else the latest readable; `LoadedRun.step` says which
    was read, also after falling back past a corrupt one).

    `overrides` ("a.b=value" strings) change the saved config before the model is built, e.g.
    `dataset.data_dir=...` on another machine. A checkpoint whose parameters do not fit the
    model its config describes is an error listing every mismatching path.
    """
    location = checkpoints.locate(path)
    step = location.step if step is None else step
    loaded, step = checkpoints.restore_params(location.directory, step=step, with_step=True)
    config = config_lib.config_from_json(checkpoints.read_config(location.directory, step))
    config = config_lib.apply_overrides(config, list(overrides)) if overrides else config
    config.distributed.coordinator_address = ""  # evaluation never re-initialises jax
    setup = setup_lib.build(config)
    init_model = steps.init_model(setup.model)
    variables = jax.eval_shape(lambda: init_model.init(jax.random.key(0), setup.sample_images))
    check_fit(_shapes(variables["params"]), _shapes(loaded))
    params = vl.shard_params(setup.strategy, loaded)
    router_state = _router_state(location.directory, step, setup, variables)
    return LoadedRun(location.directory, step, config, setup, params, router_state)


def _router_state(directory: pathlib.Path, step: int, setup: Any, variables: Any) -> Any:
    """The checkpoint's router state, replicated on the strategy's mesh ({} if the model's
    routers keep none); an error if they keep one the checkpoint lacks or does not fit."""
    expected = dict(variables.get(vl.ROUTER_STATE, {}))
    if not expected:
        return {}
    shardings = vl.router_state_shardings(setup.strategy, expected)

    def laid_out(saved: Any) -> Any:  # read straight into the replicated layout, once checked
        if not jax.tree.leaves(saved):
            return {}  # saved by stateless routers: refused below
        check_fit(_shapes(expected), _shapes(saved))
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            saved,
            shardings,
        )

    state = checkpoints.restore_router_state(directory, step, laid_out)
    if not state:
        raise ValueError(
            f"the model's routers ({setup.model.moe.router!r}) keep state (e.g. a balancing "
            f"bias) but checkpoint {directory / str(step)} has none: it was written by a run "
            "with another router or an older vmoe-train"
        )
    return state


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {path: np.shape(leaf) for path, leaf in flat.items()}


def with_routing(
    model: vl.VisionTransformer, router: str | None = None, **router_options: Any
) -> vl.VisionTransformer:
    """`model` with another router name (e.g. "bpr" for vanilla-trained params) and/or router
    options; the parameter tree is unchanged (top_k, bpr and hash share it)."""
    if model.moe is None or (router is None and not router_options):
        return model
    moe = model.moe
    options = {**dict(moe.router_options), **router_options}
    return model.clone(
        moe=dataclasses.replace(moe, router=router or moe.router, router_options=options)
    )


def forward(
    run: LoadedRun,
    split: str,
    *,
    batch_size: int | None = None,
    model: vl.VisionTransformer | None = None,
    k: int | None = None,
    capacity_factor: float | None = None,
    apply_fn: Any = None,
) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
    """(model output, batch) for every padded eval batch of `split`, in order, both global:
    the batch's features (label, mask, ...) as host numpy arrays of the whole global batch
    (`to_host` does the same for outputs), so every process sees every example.

    Every example is in exactly one batch (`batch["mask"]` is False on padding), whatever the
    batch size and the number of processes. `apply_fn(variables, images)` (jitted once by the
    caller; `variables` is `run.variables`) replaces the model call, for evaluators that need
    other outputs.
    """
    model = model or run.model
    fn = apply_fn or jax.jit(
        lambda variables, images: model.apply(
            variables, images, k=k, capacity_factor=capacity_factor
        )
    )
    batches = vmoe_data.eval_pipeline(
        run.dataset,
        split=split,
        batch_size=batch_size or run.config.eval_batch_size,
        pp=run.config.pp.eval,
        cache=setup_lib.data_cache(run.config),
    )
    for batch in batches:
        global_batch = run.setup.to_global(batch)
        out = fn(run.variables, global_batch.pop("image"))
        yield out, {key: to_host(value) for key, value in global_batch.items()}


def to_host(x: Any) -> np.ndarray:
    """A global array as a numpy array on this host: every process gets all of it."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
