"""Hash routing (Roller et al., "Hash Layers For Large Sparse Models", 2021), for image tokens.

Each token position s in a group is sent to K experts picked by a fixed hash of (seed, s, e):
no parameters, no learning, no balancing loss, and the same position always meets the same
experts. Positions are within a group, so with a group = whole images the hash sees patch
positions. Combine weights are 1/K. Capacity and dropping work as for any token-choice router.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

import vmoe_plugins
import vmoe_routing


def mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (MurmurHash3 fmix32): a bijection with good avalanche."""
    x = x.astype(jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


@dataclasses.dataclass(frozen=True)
class HashRouter(vmoe_routing.TokenChoiceRouter):
    """Routes token position s to the K experts with the largest hash(seed, s, e).

    Attributes:
      num_experts, k, capacity_factor, eval_capacity_factor, capacity_rounding,
        capacity_multiple_of: as in `vmoe_routing.TokenChoiceRouter` (capacity selection is
        the shared one, not re-implemented here).
      seed: picks the hash function; different seeds give different position -> expert maps.
    """

    name: ClassVar[str] = "hash"

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        seed = vmoe_plugins.check_int("seed", self.seed, low=0, high=2**32 - 1)
        object.__setattr__(self, "seed", seed)

    def init(self, rng: jax.Array, d_model: int) -> dict:
        del rng, d_model
        return {}

    def experts_for_positions(self, group_size: int) -> jax.Array:
        """[S, K] int32: the experts of each position, best hash first."""
        e = self.num_experts
        position = jnp.arange(group_size, dtype=jnp.uint32)[:, None]
        expert = jnp.arange(e, dtype=jnp.uint32)[None, :]
        score = mix32(mix32(position ^ mix32(jnp.uint32(self.seed))) + expert)
        # Distinct scores per row are not guaranteed; a stable sort breaks ties by expert id.
        return jnp.argsort(score, axis=-1, descending=True, stable=True)[:, : self.k].astype(
            jnp.int32
        )

    def __call__(
        self,
        params: dict,
        x_gsd: jax.Array,
        *,
        rng: jax.Array | None = None,
        deterministic: bool = True,
    ) -> vmoe_routing.Routing:
        del params, rng
        vmoe_routing.check_tokens(x_gsd)
        g, s, _ = x_gsd.shape
        expert_gsk = jnp.broadcast_to(self.experts_for_positions(s), (g, s, self.k))
        weight_gsk = jnp.full((g, s, self.k), 1.0 / self.k, jnp.float32)
        return self.assign(expert_gsk, weight_gsk, deterministic=deterministic)
