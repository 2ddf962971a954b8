"""The training state: everything a step reads and writes, as one explicit pytree value.

    state = create_train_state(model, optimizer, rng, sample_images)   # vmoe_train.steps
    state, metrics = train_step(state, batch)                          # pure, jitted
    checkpointer.save(int(state.step), state, ...)                     # all of it, nothing else

`rng` is raw uint32 key data (`jax.random.key_data`), so checkpoints hold plain arrays; the step's
randomness is `fold_in(rng, step)`: a resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Attributes:
    step: int32 scalar, the number of optimizer updates applied so far.
    params: the model parameters.
    opt_state: the optax optimizer state.
    rng: uint32 key data; the randomness of step s is `step_rng(state)`.
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)

    def step_rng(self) -> Array:
        """The (typed) key of this step: a pure function of the seed and the step number."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


jax.tree_util.register_dataclass(
    TrainState, data_fields=["step", "params", "opt_state", "rng"], meta_fields=[]
)
