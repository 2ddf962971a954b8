"""The training state: everything a step reads and writes, as one explicit pytree value.

    state = create_train_state(model, optimizer, rng, sample_images)   # vmoe_train.steps
    state, metrics = train_step(state, batch)                          # pure, jitted
    checkpointer.save(int(state.step), state, ...)                     # all of it, nothing else

`router_state` is the routers' non-gradient state (e.g. an aux-loss-free router's balancing bias:
the flax collection `vmoe_layers.ROUTER_STATE`), {} for models whose routers keep none; it is
checkpointed and restored with the rest. `rng` is raw uint32 key data (`jax.random.key_data`),
so checkpoints hold plain arrays; the step's randomness is `fold_in(rng, step)`: a resumed run
draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from vmoe_layers import ROUTER_STATE

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Attributes:
    step: int32 scalar, the number of optimizer updates applied so far.
    params: the model parameters.
    opt_state: the optax optimizer state.
    rng: uint32 key data; the randomness of step s is `step_rng(state)`.
    router_state: the routers' state ({block: {"moe": {"router": ...}}}), updated by each train
      step from its routing statistics, outside the gradient; {} when no router keeps any.
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array
    router_state: Any = dataclasses.field(default_factory=dict)

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)

    def step_rng(self) -> Array:
        """The (typed) key of this step: a pure function of the seed and the step number."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

    def variables(self) -> dict[str, Any]:
        """What `model.apply` takes: {"params": ...} and, when the routers keep state,
        {"router_state": ...} beside it."""
        return model_variables(self.params, self.router_state)


def model_variables(params: Any, router_state: Any = None) -> dict[str, Any]:
    """{"params": params}, with the routers' state beside it when there is any (the variables
    `model.apply` takes; a stateless model's apply is given no empty collection)."""
    if router_state:
        return {"params": params, ROUTER_STATE: router_state}
    return {"params": params}


jax.tree_util.register_dataclass(
    TrainState,
    data_fields=["step", "params", "opt_state", "rng", "router_state"],
    meta_fields=[],
)
