"""Hash routing (Roller et al., "Hash Layers For Large Sparse Models", 2021), for image tokens.

Each token position s in a group is sent to K experts picked by a fixed hash of (seed, s, e):
no parameters, no learning, no balancing loss, and the same position always meets the same
experts. Positions are within a group, so with a group = whole images the hash sees patch
positions. Combine weights are 1/K. Capacity and dropping work as for any token-choice router.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

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
class HashRouter:
    """Routes token position s to the K experts with the largest hash(seed, s, e).

    Attributes:
      num_experts: E.
      k: experts per position, 1 <= k <= E.
      capacity_factor, eval_capacity_factor: as in `vmoe_routing.TopKRouter`.
      seed: picks the hash function; different seeds give different position -> expert maps.
    """

    name: ClassVar[str] = "hash"

    num_experts: int
    k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # One source of truth for option checks: the built-in top-K router's validation.
        vmoe_routing.TopKRouter(
            num_experts=self.num_experts,
            k=self.k,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
        )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**32)")

    def replace(self, **changes: Any) -> HashRouter:
        return dataclasses.replace(self, **changes)

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
        factor = self.capacity_factor
        if deterministic and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        capacity = vmoe_routing.compute_capacity(s, self.num_experts, self.k, factor)
        return vmoe_routing.token_choice_routing(
            expert_gsk, weight_gsk, num_experts=self.num_experts, capacity=capacity
        )
