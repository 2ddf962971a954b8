"""Built-in routers: vanilla top-K token choice, and Batch Priority Routing (BPR).

`TokenChoiceRouter` is their base, and the base for any token-choice router a plugin writes: it
holds K and the capacity options and turns each token's K choices into a `Routing`.

A router is an immutable config object with two pure functions:

    params = router.init(rng, d_model)
    routing = router(params, x_gsd, rng=rng, deterministic=False)

Routers own their parameters (here the [D, E] gate matrix, no bias) and never hold state, so one
router object can be reused, compared, hashed and changed with `router.replace(k=..., ...)`
(for example to evaluate a trained model at another K or capacity without touching its params).

A router may also own *router state*: arrays that are not trained by gradients but updated
after each training step from that step's routing statistics (e.g. the per-expert balancing
bias of auxiliary-loss-free routing, DeepSeek-V3). Such a router has two more pure functions
(`ROUTER_STATE_MEMBERS`, see `StatefulRouter`) and takes the state in every call:

    state = router.init_state(d_model)                          # a pytree of arrays
    routing = router(params, x_gsd, rng=rng, deterministic=False, state=state)
    state = router.update_state(state, metrics)                 # after the step, no gradient

`metrics` are the routing metrics of the whole batch (`Routing.metrics`, group means, joined
over every device that routed some of its groups with `combine_over_shards`), so every device
computes the same new state. The object itself stays immutable: the state travels beside the
params (vmoe-layers keeps it in its own flax collection). `has_state(router)` tells them apart.

Gating (V-MoE, Section 2.1): logits = x @ W; during training Gaussian noise of std
noise_std / E is added to the logits (group g's noise drawn from its own key, see
`vmoe_routing.shards`); gates = softmax(noisy logits). Each token picks its
top-K gates; the combine weights are those raw softmax values (not renormalised over the K), or,
with `normalize_weights=True`, the K gates divided by their sum (Mixtral, DeepSeek).
The importance loss uses the clean softmax; the load loss measures how likely each expert
would still be picked if the noise were drawn again.
"""

from __future__ import annotations

import dataclasses
import decimal
import fractions
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import jax
import jax.numpy as jnp

from vmoe_plugins import checks
from vmoe_routing import losses
from vmoe_routing.capacity import ROUNDINGS, compute_capacity
from vmoe_routing.decision import BlockRouting, DenseRouting, Routing
from vmoe_routing.shards import gate_noise
from vmoe_routing.token_choice import token_choice_routing

Array = jax.Array
PRIORITIES = ("max", "sum")
_R = TypeVar("_R", bound="TokenChoiceRouter")


# What every router has: the Router protocol's members. The router registry checks them on every
# router a plugin returns, and MoeLayer on every router object it is given.
ROUTER_MEMBERS = ("num_experts", "init", "__call__", "replace")
# What a router with state has besides (`StatefulRouter`): both, or neither (`has_state`).
ROUTER_STATE_MEMBERS = ("init_state", "update_state")


@runtime_checkable
class Router(Protocol):
    """What every router provides (built-in or from a plugin): `ROUTER_MEMBERS`."""

    num_experts: int

    def init(self, rng: Array, d_model: int) -> Any:
        """Returns the router's parameters (a pytree) for inputs of width d_model."""
        ...

    def __call__(
        self, params: Any, x_gsd: Array, *, rng: Array | None = None, deterministic: bool = True
    ) -> Routing | DenseRouting | BlockRouting:
        """Routes x [G, S, D]. `deterministic=False` means training: noise, training capacity.

        `rng` is one key or one key per group ([G] keys); draw noise with
        `vmoe_routing.gate_noise` so that group g's noise comes from its own key (then the
        groups can be routed on different devices with the same result)."""
        ...

    def replace(self, **changes: Any) -> Router:
        """A copy with some options changed (e.g. k, capacity_factor), params unaffected."""
        ...


@runtime_checkable
class StatefulRouter(Router, Protocol):
    """A router that owns state besides its params: `Router`, plus `ROUTER_STATE_MEMBERS`, and
    `state=` in every call.

    The state is not trained by gradients: the caller (vmoe-layers' `MoeLayer`) keeps it, passes
    it to every call and, after a training step, replaces it with `update_state(state,
    metrics)`, metrics joined over the whole batch, so every device holds the same state."""

    def init_state(self, d_model: int) -> Any:
        """The initial state (a pytree of arrays) for inputs of width d_model."""
        ...

    def __call__(
        self,
        params: Any,
        x_gsd: Array,
        *,
        rng: Array | None = None,
        deterministic: bool = True,
        state: Any = None,
    ) -> Routing | DenseRouting | BlockRouting:
        """Routes x [G, S, D] as `Router.__call__`, reading `state` (never changing it)."""
        ...

    def update_state(self, state: Any, metrics: dict[str, Array]) -> Any:
        """The state after a training step: a pure jax function of the state and the step's
        routing metrics (`Routing.metrics` of the whole batch: group means, e.g.
        `expert_load` [E]). No gradient flows through it."""
        ...


def has_state(router: Any) -> bool:
    """Whether `router` owns state (has `init_state` and `update_state`, and takes `state=`).

    Raises a ValueError for a router with only one of the two: its state could be neither
    created nor kept up to date."""
    present = [m for m in ROUTER_STATE_MEMBERS if callable(getattr(router, m, None))]
    if len(present) == 1:
        missing = [m for m in ROUTER_STATE_MEMBERS if m not in present]
        raise ValueError(
            f"router {type(router).__name__} has {present[0]} but not {missing[0]}; a router "
            f"with state has both of {list(ROUTER_STATE_MEMBERS)}, a router without has neither"
        )
    return bool(present)


def check_tokens(x_gsd: Array, d_model: int | None = None) -> None:
    """Raises a ValueError unless x is [G, S, D] (with D == d_model when given)."""
    if getattr(x_gsd, "ndim", None) != 3:
        shape = getattr(x_gsd, "shape", type(x_gsd).__name__)
        raise ValueError(f"x must have rank 3 [groups, group_size, d_model]; got shape {shape}")
    if d_model is not None and x_gsd.shape[-1] != d_model:
        raise ValueError(f"x has d_model={x_gsd.shape[-1]} but the router params expect {d_model}")


def gate_logits(gate_de: Array, x_gsd: Array, gate_dtype: Any = jnp.float32) -> Array:
    """[G, S, E] float32 router logits x @ W (no bias), the matmul in `gate_dtype`.

    Checks x is [G, S, D] with D the gate's first dimension. Shared by the built-in routers and
    router plugins that gate with one [D, E] matrix."""
    check_tokens(x_gsd, gate_de.shape[0])
    logits = jnp.einsum("gsd,de->gse", x_gsd.astype(gate_dtype), gate_de.astype(gate_dtype))
    return logits.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class TokenChoiceRouter:
    """What every token-choice router shares: K choices per token under a per-expert capacity.

    Subclass it (a frozen dataclass) and write `init` and `__call__`; in `__call__`, pick each
    token's K experts and weights and return `self.assign(expert_gsk, weight_gsk, ...)`, which
    selects the capacity (training or evaluation factor, rounding, multiple-of) and fills the
    buffers. `replace` and the option checks come with it.

    Attributes:
      num_experts: E.
      k: experts per token, 1 <= k <= E.
      capacity_factor: C used in training (`deterministic=False`); capacity is
        ceil(k * C * group_size / E), see `compute_capacity`.
      eval_capacity_factor: C used when `deterministic=True`; None means `capacity_factor`.
      capacity_rounding, capacity_multiple_of: passed to `compute_capacity`.
    """

    num_experts: int
    k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float | None = None
    capacity_rounding: str = "ceil"
    capacity_multiple_of: int = 1

    def __post_init__(self) -> None:
        e = checks.check_int("num_experts", self.num_experts, low=1)
        k = checks.check_int("k", self.k, low=1)
        if k > e:
            raise ValueError(f"k={k} must be <= num_experts={e}")
        checks.check_number("capacity_factor", self.capacity_factor, above=0)
        if self.eval_capacity_factor is not None:
            checks.check_number("eval_capacity_factor", self.eval_capacity_factor, above=0)
        checks.check_choice("capacity_rounding", self.capacity_rounding, ROUNDINGS)
        multiple_of = checks.check_int("capacity_multiple_of", self.capacity_multiple_of, low=1)
        # Plain ints, so that equal routers hash equal (they are static arguments under jit).
        object.__setattr__(self, "num_experts", e)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "capacity_multiple_of", multiple_of)

    def replace(self: _R, **changes: Any) -> _R:
        """A copy with some options changed (validated), e.g. `router.replace(k=1)`."""
        return dataclasses.replace(self, **changes)

    def capacity(self, group_size: int, deterministic: bool = True) -> int:
        """Slots per expert per group for groups of `group_size` tokens."""
        factor = self.capacity_factor
        if deterministic and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        return compute_capacity(
            group_size,
            self.num_experts,
            self.k,
            factor,
            rounding=self.capacity_rounding,
            multiple_of=self.capacity_multiple_of,
        )

    def assign(
        self,
        expert_gsk: Array,
        weight_gsk: Array,
        *,
        deterministic: bool,
        priority_gs: Array | None = None,
        aux_loss: Array | float = 0.0,
        aux_losses: dict[str, Array] | None = None,
    ) -> Routing:
        """The `Routing` of each token's K choices [G, S, K] at this router's capacity.

        `priority_gs` [G, S] (higher first) fills buffers by priority instead of token order.
        """
        if expert_gsk.ndim != 3 or expert_gsk.shape[-1] != self.k:
            raise ValueError(
                f"expert_gsk must have shape [G, S, k={self.k}]; got {expert_gsk.shape}"
            )
        return token_choice_routing(
            expert_gsk,
            weight_gsk,
            num_experts=self.num_experts,
            capacity=self.capacity(expert_gsk.shape[1], deterministic),
            priority_gs=priority_gs,
            aux_loss=aux_loss,
            aux_losses=aux_losses,
        )


@dataclasses.dataclass(frozen=True)
class TopKRouter(TokenChoiceRouter):
    """Vanilla token-choice top-K routing (V-MoE, GShard): buffers filled in token order.

    Attributes (besides `TokenChoiceRouter`'s num_experts, k, capacity options):
      noise_std: gating noise has std noise_std / E, in training only. 0 disables it.
      gate_dtype: dtype of the gate matmul (softmax and losses always run in float32).
      importance_loss_weight, load_loss_weight, gshard_loss_weight, z_loss_weight: the
        auxiliary losses' weights; a loss with weight 0 is not computed.
      normalize_weights: False (V-MoE and its release): a token's combine weights are its K
        raw softmax gates, summing to less than 1 for K < E. True: the K gates divided by their
        sum, so each token's weights sum to 1 before any drop (Mixtral, DeepSeek); BPR's
        priority and the aux losses still use the raw gates. With it, a V-MoE upcycled from a
        dense ViT (every expert a copy of the block's MLP) computes at step 0 exactly what the
        dense model does wherever no choice is dropped.
    """

    name: ClassVar[str] = "top_k"

    noise_std: float = 1.0
    gate_dtype: Any = jnp.float32
    importance_loss_weight: float = 0.005
    load_loss_weight: float = 0.005
    gshard_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    normalize_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        normalize = checks.check_bool("normalize_weights", self.normalize_weights)
        object.__setattr__(self, "normalize_weights", normalize)
        scales = ("noise_std", *(f"{f}_loss_weight" for f in ("importance", "load", "gshard", "z")))
        for field in scales:
            value = checks.check_number(field, getattr(self, field), at_least=0)
            if isinstance(value, (decimal.Decimal, fractions.Fraction)):
                # They multiply jax arrays, which take no Decimal or Fraction: a float is exact
                # enough for a scale (the capacity factor is kept as given: it sets a shape).
                object.__setattr__(self, field, float(value))
        if self.load_loss_weight > 0 and self.noise_std == 0:
            raise ValueError(
                f"load_loss_weight={self.load_loss_weight} needs noise_std > 0 (the load loss is "
                "the selection probability under gating noise); set one of them differently"
            )

    def init(self, rng: Array, d_model: int) -> dict[str, Array]:
        """{"gate": [D, E] float32}, LeCun-normal initialised."""
        init = jax.nn.initializers.lecun_normal()
        return {"gate": init(rng, (d_model, self.num_experts), jnp.float32)}

    def priority(self, weight_gsk: Array) -> Array | None:
        """[G, S] token priority for buffer filling; None means token order."""
        del weight_gsk
        return None

    def __call__(
        self,
        params: dict[str, Array],
        x_gsd: Array,
        *,
        rng: Array | None = None,
        deterministic: bool = True,
    ) -> Routing:
        expert_gsk, weight_gsk, aux_loss, aux = self.choose(
            params, x_gsd, rng=rng, deterministic=deterministic
        )
        return self.assign(
            expert_gsk,
            self.combine_weights(weight_gsk),
            deterministic=deterministic,
            priority_gs=self.priority(weight_gsk),
            aux_loss=aux_loss,
            aux_losses=aux,
        )

    def combine_weights(self, weight_gsk: Array) -> Array:
        """The combine weights [G, S, K] of the raw top-K gates `weight_gsk` (from `choose`):
        themselves, or divided by their sum with `normalize_weights`."""
        if not self.normalize_weights:
            return weight_gsk
        return weight_gsk / jnp.sum(weight_gsk, axis=-1, keepdims=True)

    def choose(
        self,
        params: dict[str, Array],
        x_gsd: Array,
        *,
        rng: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, Array, Array, dict[str, Array]]:
        """Each token's K choices, before any capacity: the gating half of `__call__`.

        Returns (expert_gsk [G, S, K] int32 best first, weight_gsk [G, S, K] the raw softmax
        gates, aux_loss the weighted sum, aux_losses by name). Routers that place the choices
        differently (e.g. without a capacity) reuse it through a TopKRouter they hold.
        """
        logits, noisy_logits, gates = self.gate(params, x_gsd, rng=rng, deterministic=deterministic)
        weight_gsk, expert_gsk = jax.lax.top_k(gates, self.k)
        aux_loss, aux = self.aux_losses(logits, noisy_logits, gates, expert_gsk)
        return expert_gsk.astype(jnp.int32), weight_gsk, aux_loss, aux

    def gate(
        self,
        params: dict[str, Array],
        x_gsd: Array,
        *,
        rng: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, Array, Array]:
        """(logits, noisy logits, gates = softmax(noisy logits)), each [G, S, E] float32: the
        gating before any choice, with training noise of std noise_std / E when
        deterministic=False. Token-choice routers that choose otherwise reuse it."""
        logits = gate_logits(params["gate"], x_gsd, self.gate_dtype)
        noisy_logits = logits
        if not deterministic and self.noise_std > 0:
            if rng is None:
                raise ValueError(
                    f"router {self.name!r} needs rng when deterministic=False and "
                    f"noise_std={self.noise_std} > 0"
                )
            noise_std = self.noise_std / self.num_experts
            noisy_logits = logits + noise_std * gate_noise(rng, logits.shape)
        return logits, noisy_logits, jax.nn.softmax(noisy_logits, axis=-1)

    def aux_losses(
        self, logits: Array, noisy_logits: Array, gates: Array, expert_gsk: Array
    ) -> tuple[Array, dict[str, Array]]:
        """(the weighted sum, the unweighted losses by name) of the enabled auxiliary losses,
        from `gate`'s outputs and the chosen experts [G, S, K]."""
        aux = self._aux_losses(
            logits, noisy_logits, gates, expert_gsk, self.noise_std / self.num_experts
        )
        weights = {
            "importance": self.importance_loss_weight,
            "load": self.load_loss_weight,
            "gshard": self.gshard_loss_weight,
            "z": self.z_loss_weight,
        }
        aux_loss = sum((weights[name] * value for name, value in aux.items()), jnp.float32(0))
        return aux_loss, aux

    def _aux_losses(self, logits, noisy_logits, gates, expert_gsk, noise_std) -> dict[str, Array]:
        aux: dict[str, Array] = {}
        if self.importance_loss_weight > 0:
            aux["importance"] = losses.importance_loss(jax.nn.softmax(logits, axis=-1))
        if self.load_loss_weight > 0:
            # Without noise (evaluation) the bar is the clean k-th logit: the loss then reports
            # how balanced the load would be in expectation under training noise.
            # The bar is the k-th largest noisy logit: the smallest among the chosen experts'
            # (softmax keeps the order), so the top-K routing already made is reused.
            chosen = jnp.take_along_axis(noisy_logits, expert_gsk, axis=-1)
            threshold_gs = jnp.min(chosen, axis=-1)
            aux["load"] = losses.load_loss_from_threshold(logits, threshold_gs, noise_std)
        if self.gshard_loss_weight > 0:
            aux["gshard"] = losses.gshard_loss(gates)
        if self.z_loss_weight > 0:
            aux["z"] = losses.z_loss(logits)
        return aux


@dataclasses.dataclass(frozen=True)
class BprRouter(TopKRouter):
    """Batch Priority Routing (V-MoE, Section 4.1): top-K, with buffers filled by priority.

    Within each group, tokens are ordered by a priority score before buffers are filled, so when
    capacity runs out it is the low-priority tokens that are dropped. Still K-major: all first
    choices (by priority) before any second choice.

    Attributes:
      priority_score: "max" (the token's top-1 gate, as in the paper and its release) or
        "sum" (the sum of its top-K gates).
    """

    name: ClassVar[str] = "bpr"

    priority_score: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.check_choice("priority_score", self.priority_score, PRIORITIES)

    def priority(self, weight_gsk: Array) -> Array:
        if self.priority_score == "max":
            # The top-1 gate. max() rather than weight_gsk[..., 0]: slicing a top_k result made
            # XLA:CPU replace TopK by a full sort (BPR router forward 3.9 -> 1.2 ms, E=32).
            return jnp.max(weight_gsk, axis=-1)
        return jnp.sum(weight_gsk, axis=-1)
