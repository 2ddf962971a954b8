"""The sparse Mixture-of-Experts layer: group tokens, route, dispatch, run experts, combine.

    x [..., D] --group--> x_gsd [G, S, D] --router--> Routing (indices, weights, aux losses)
               --dispatch--> x_gecd [G, E, C, D] --experts--> y_gecd [G, E, C, D]
               --combine--> y_gsd [G, S, D] --dropout, ungroup--> y [..., D]

The part from routing to combining runs where the exchange puts it: once over every group, or
(every built-in sharding strategy) on each device for its own groups, with at most the buffers
crossing devices (see `vmoe_layers.exchange`). Gating noise is drawn per group
(`vmoe_routing.group_keys`), so both give the same result.

Routers come from vmoe-routing by name (`top_k`, `bpr`, or any plugin such as `hash`) or as a
router object; expert types from this package's registry (`mlp`, `glu`, or plugins). Dispatch and
combine go through indices, so nothing of shape [G, S, E, C] is built. Tokens that lose their
place in every chosen expert come out as zeros (the residual connection of the block carries
them); the layer reports their share as `no_expert_fraction`.

A router with state (`vmoe_routing.has_state`, e.g. the aux-free plugin's balancing bias) keeps
it in the flax collection `ROUTER_STATE`: `init` creates it (`router.init_state(D)`), every call
passes it to the router, and a training call (`deterministic=False`) in which the collection is
mutable (`apply(..., mutable=[ROUTER_STATE])`) replaces it with `router.update_state(state,
metrics)`, metrics being those the layer returns: group means joined over every device that
routed some of the groups, so every device computes the same state. No gradient reaches it.
Layers with stateless routers have no such collection.

Shape legend: G groups, S tokens per group (group size), E experts, C capacity, D model dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

import vmoe_plugins
import vmoe_routing
from vmoe_layers.exchange import ExpertExchange, exchange_or_local, run_local_experts
from vmoe_layers.experts import get_expert_type, init_shared, init_stacked
from vmoe_layers.variants import LayerShape, is_branch, make_variants, reshaped

Array = jax.Array

# The parameter-tree key under which a MoE layer keeps its stacked experts. Every array below it
# has the expert axis first; sharding strategies find expert params by this key.
EXPERTS_KEY = "experts"
GATING_RNG = "gating"  # rng collection for the router's training noise
# The flax collection of routers' state (not trained by gradients); a MoE layer keeps its
# router's under the same name as its params, ROUTER_KEY.
ROUTER_STATE = "router_state"
ROUTER_KEY = "router"
DISPATCH_PATHS = ("index", "einsum")
EXPERT_INITS = ("independent", "shared")

# V-MoE's routing defaults (K=2, C=1.05 in pre-training). The one place they live: a router named
# by `MoeLayer.router` gets these, with the user's `router_options` merged over them (a default
# the named router does not take is left out, so routers without a K still work). Router objects
# are used as they were built.
DEFAULT_ROUTER_OPTIONS: Mapping[str, Any] = FrozenDict({"k": 2, "capacity_factor": 1.05})


@dataclasses.dataclass(frozen=True)
class MoeOutput:
    """What a MoE layer returns (a pytree).

    Attributes:
      output: same shape as the input.
      aux_loss: scalar, the router's weighted auxiliary loss: add it to the training loss.
      aux_losses: the router's unweighted auxiliary losses by name, for logging.
      metrics: routing statistics by name (e.g. dropped_fraction, expert_load [E]).
    """

    output: Array
    aux_loss: Array
    aux_losses: dict[str, Array]
    metrics: dict[str, Array]


jax.tree_util.register_dataclass(
    MoeOutput, data_fields=["output", "aux_loss", "aux_losses", "metrics"], meta_fields=[]
)


def group_tokens(x: Array, group_size: int | None) -> Array:
    """[..., T, D] -> [G, S, D]. None means one group per leading index (S = T: one image)."""
    if x.ndim < 2:
        raise ValueError(f"x must have shape [..., tokens, d_model]; got {x.shape}")
    num_tokens = x.size // x.shape[-1]
    s = x.shape[-2] if group_size is None else group_size
    if not vmoe_plugins.is_int(s):  # the shared rule: numpy integers yes, bools no
        raise ValueError(f"group_size={group_size!r} must be an integer >= 1, or None")
    s = int(s)  # a shape: numpy integers become plain ints
    if s < 1 or num_tokens % s:
        raise ValueError(
            f"group_size={group_size!r} does not divide the {num_tokens} tokens of the input "
            f"(shape {x.shape}); allowed: a divisor of {num_tokens}, or None (one group per image)"
        )
    return x.reshape(num_tokens // s, s, x.shape[-1])


def router_name(router: Any) -> str:
    """A router's registered name if it is a name or has one, else its type name."""
    if isinstance(router, str):
        return router
    return getattr(type(router), "name", type(router).__name__)


OVERRIDABLE = ("k", "capacity_factor")  # what a call may override, if the router has it


def _router_fields(router: Any) -> set[str]:
    if dataclasses.is_dataclass(router):
        return {f.name for f in dataclasses.fields(router)}
    return {name for name in (*OVERRIDABLE, "eval_capacity_factor") if hasattr(router, name)}


def _static_option(name: str, value: Any) -> Any:
    """A per-call k (a Python int) or capacity factor (as given), checked by the shared rule."""
    if isinstance(value, jax.Array):  # traced values too
        raise ValueError(
            f"{name}={value!r} must be a static Python number (it sets the capacity, a "
            f"shape): pass it outside jit, or as a static argument"
        )
    if name == "k":
        return vmoe_plugins.check_int("k", value, low=1)
    # Kept as given, not float(value): the capacity is computed exactly from the decimal the
    # user wrote, so np.float32(1.1) must reach the router as it is (capacity(200) = 55, not 56).
    return vmoe_plugins.check_number("capacity_factor", value, above=0)


def override_router(router: Any, k: int | None = None, capacity_factor: float | None = None):
    """`router` with K and/or the capacity factor (training and evaluation) replaced.

    Both must be static numbers (Python or NumPy): they set the capacity, a shape. K becomes a
    Python int; the capacity factor is passed on as given (the capacity is computed exactly from
    it). A router supports the overrides it has fields for (`eval_capacity_factor` is replaced
    too where it exists)."""
    fields = _router_fields(router)
    changes: dict[str, Any] = {}
    for name, value in (("k", k), ("capacity_factor", capacity_factor)):
        if value is None:
            continue
        value = _static_option(name, value)
        if name not in fields:
            supported = [f for f in OVERRIDABLE if f in fields] or "nothing"
            raise ValueError(
                f"router {type(router).__name__} has no field {name!r}, so {name}= cannot be "
                f"overridden per call; it supports: {supported}"
            )
        changes[name] = value
        if name == "capacity_factor" and "eval_capacity_factor" in fields:
            changes["eval_capacity_factor"] = value
    if not changes:
        return router
    if not hasattr(router, "replace"):
        raise ValueError(
            f"router {type(router).__name__} has no replace(); k and capacity_factor cannot be "
            "overridden per call for it"
        )
    return _replace_router(router, changes)


def _replace_router(router: Any, changes: Mapping[str, Any]) -> Any:
    """`router.replace(**changes)`, with an unknown option a one-line ValueError listing the
    allowed ones (the router's dataclass fields) instead of a TypeError from `replace`."""
    if dataclasses.is_dataclass(router):
        allowed = [f.name for f in dataclasses.fields(router) if f.init]
        unknown = sorted(set(changes) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown router option(s) {unknown} for router {type(router).__name__}; "
                f"allowed: {allowed}"
            )
    try:
        return router.replace(**changes)
    except TypeError as error:
        message = " ".join(str(error).split())  # one line
        raise ValueError(
            f"router {type(router).__name__}.replace() refused the option(s) "
            f"{sorted(changes)}: {message}"
        ) from error


class MoeLayer(nn.Module):
    """A sparse MoE feed-forward layer (Flax linen).

    Attributes:
      num_experts: E.
      mlp_dim: hidden width of each expert.
      router: a vmoe-routing router name ("top_k", "bpr", or a plugin's, e.g. "hash"), or a router
        object (anything with the members of `vmoe_routing.Router`, e.g.
        `vmoe_routing.BprRouter(num_experts=8, k=2)`); its num_experts must equal this layer's.
      router_options: options for the router (k, capacity_factor, noise_std, ...), merged over
        `DEFAULT_ROUTER_OPTIONS` (k=2, capacity_factor=1.05) for a router name; num_experts comes
        from this layer. With a router object they are applied with `router.replace(...)`.
      expert_type: a registered expert type name ("mlp", "glu", or a plugin's).
      expert_options: options for the expert type besides mlp_dim (e.g. activation).
      group_size: S, tokens per routing group; must divide the number of tokens of the batch.
        None: one group per image (per index of the leading axes).
      dropout_rate: dropout on the layer's output (training only; rng collection "dropout").
      dtype: computation dtype (e.g. jnp.bfloat16); the router gates in its own gate_dtype.
      param_dtype: dtype of the expert parameters.
      exchange: how buffers reach the experts (see `vmoe_layers.exchange`); None runs all
        experts where the buffers are. Sharding strategies provide it. `init` always runs the
        experts locally (same parameters), so a model can be initialised from a single image.
      dispatch_path: "index" (default: gathers by index, no [G, S, E, C] tensor) or "einsum"
        (the one-hot reference: `Routing.to_dense()` and einsums; for tests and benchmarks).
      dispatch_dtype: None (default), or a dtype (e.g. jnp.bfloat16) the expert buffers are
        rounded to on their way to and back from the experts, as the original V-MoE release's
        bfloat16 dispatcher did (to halve all-to-all traffic): the experts still compute in
        `dtype` on the rounded inputs, and the rounded outputs are combined in `dtype`.
      expert_init: "independent" (default: each of the E experts drawn with its own key) or
        "shared" (one draw copied to all E, as the V-MoE release's `split_rngs=False`: the
        experts start equal and only routing sets them apart).
      variants: {name: {option: value}} of MoE layer variants (`vmoe_layers.variants`, plugins
        such as "fine_grained" and "shared_experts"): they may reshape the routed part (E, the
        experts' width, the router's K: `layer_shape()`) and add branches every token goes
        through (their params under `<name>/`, their outputs added to the layer's).

    Call: `layer(x, deterministic=True, k=None, capacity_factor=None) -> MoeOutput` with x of
    shape [..., T, D]. `deterministic=False` is training: gating noise (rng collection
    "gating"), the training capacity factor, dropout. `k` / `capacity_factor` override the
    router's for this call only (e.g. evaluate with fewer experts or a smaller capacity);
    the parameters do not change.

    Router state: a router with state (`vmoe_routing.has_state`) keeps it in the collection
    `ROUTER_STATE` ({"router": state}), which `init` returns beside "params"; every `apply`
    must pass it (`{"params": ..., "router_state": ...}`), and a training call that names it
    mutable (`mutable=[ROUTER_STATE]`) returns it updated from the batch's routing metrics.
    """

    num_experts: int
    mlp_dim: int
    router: str | vmoe_routing.Router = "top_k"
    router_options: Mapping[str, Any] | None = None
    expert_type: str = "mlp"
    expert_options: Mapping[str, Any] | None = None
    group_size: int | None = None
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    exchange: ExpertExchange | None = None
    dispatch_path: str = "index"
    dispatch_dtype: Any = None
    expert_init: str = "independent"
    variants: Mapping[str, Mapping[str, Any]] | None = None

    def layer_shape(self) -> LayerShape:
        """The routed part as built: E, the experts' width and the router's options (with
        `DEFAULT_ROUTER_OPTIONS` for a router name), after the variants' reshaping."""
        options = dict(self.router_options or {})
        if "num_experts" in options:
            raise ValueError(
                f"router_options must not set num_experts={options['num_experts']!r}; it comes "
                f"from the layer's num_experts={self.num_experts}"
            )
        if isinstance(self.router, str):
            registry = vmoe_routing.ROUTERS
            defaults = {
                name: value
                for name, value in DEFAULT_ROUTER_OPTIONS.items()
                if registry.accepts(self.router, name)
            }
            options = {**defaults, **options}
        shape = LayerShape(self.num_experts, self.mlp_dim, options)
        return reshaped(shape, make_variants(self.variants))

    def make_router(self) -> Any:
        """The router this layer uses: built from its name, or the given object (checked)."""
        shape = self.layer_shape()
        options = dict(shape.router_options)
        if isinstance(self.router, str):
            return vmoe_routing.get_router(self.router, num_experts=shape.num_experts, **options)
        router = self.router
        missing = vmoe_plugins.missing_members(router, vmoe_routing.ROUTER_MEMBERS)
        if missing:
            raise ValueError(
                f"router={router!r} is neither a router name nor a router: "
                f"{vmoe_plugins.with_article(type(router).__name__)} without {missing}; "
                f"allowed: a name in {vmoe_routing.available_routers()} or an object with "
                f"{list(vmoe_routing.ROUTER_MEMBERS)}"
            )
        if router.num_experts != shape.num_experts:
            raise ValueError(
                f"router {type(router).__name__} has num_experts={router.num_experts} but the "
                f"layer has num_experts={shape.num_experts}; they must be equal"
            )
        return _replace_router(router, options) if options else router

    def _round_buffers(self, x_gecd: Array) -> Array:
        """Expert buffers in `dtype`, through `dispatch_dtype` first when it is set."""
        if self.dispatch_dtype is not None:
            x_gecd = x_gecd.astype(self.dispatch_dtype)
        return x_gecd.astype(self.dtype)

    def make_experts(self) -> Any:
        return get_expert_type(
            self.expert_type,
            mlp_dim=self.layer_shape().mlp_dim,
            **dict(self.expert_options or {}),
        )

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        deterministic: bool = True,
        k: int | None = None,
        capacity_factor: float | None = None,
    ) -> MoeOutput:
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate!r} must be in [0, 1)")
        if self.expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init={self.expert_init!r} must be one of {EXPERT_INITS}")
        if self.dispatch_path not in DISPATCH_PATHS:
            raise ValueError(
                f"dispatch_path={self.dispatch_path!r} must be one of {DISPATCH_PATHS}"
            )
        if self.dispatch_dtype is not None:
            try:
                floating = jnp.issubdtype(jnp.dtype(self.dispatch_dtype), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise ValueError(
                    f"dispatch_dtype={self.dispatch_dtype!r} must be None or a floating dtype, "
                    "e.g. jnp.bfloat16 or 'bfloat16'"
                )
        d = x.shape[-1]
        # The router sees the tokens before the compute-dtype cast, so a float32 gate_dtype gates
        # in float32 even when the experts compute in bfloat16.
        x_in_gsd = group_tokens(x, self.group_size)
        router = self.make_router()
        experts = self.make_experts()
        router_params = self.param(ROUTER_KEY, lambda key: router.init(key, d))
        stateful = vmoe_routing.has_state(router)
        router_state = None
        if stateful:
            if not self.is_initializing() and not self.has_variable(ROUTER_STATE, ROUTER_KEY):
                raise ValueError(
                    f"router {router_name(self.router)!r} keeps state (not trained by "
                    f"gradients) in the {ROUTER_STATE!r} collection, which this apply() was "
                    f"not given: pass it beside the params, apply({{'params': params, "
                    f"'{ROUTER_STATE}': router_state}}, ...) (model.init returns it)"
                )
            state_variable = self.variable(ROUTER_STATE, ROUTER_KEY, router.init_state, d)
            router_state = jax.lax.stop_gradient(state_variable.value)

        def init_experts(key):
            """{name: [E, *shape]}: each of the E experts drawn with its own key, or one draw
            copied to all of them ("shared")."""
            e, dtype = router.num_experts, self.param_dtype
            specs = sorted(experts.param_specs(d).items())
            draw = init_stacked if self.expert_init == "independent" else init_shared
            return {
                name: draw(spec, jax.random.fold_in(key, i), e, dtype)
                for i, (name, spec) in enumerate(specs)
            }

        expert_params = self.param(EXPERTS_KEY, init_experts)
        router = override_router(router, k, capacity_factor)

        keys_g = None
        if not deterministic:
            if self.has_rng(GATING_RNG):
                # One key per group, split over devices with the groups (see `exchange`).
                keys_g = vmoe_routing.group_keys(self.make_rng(GATING_RNG), x_in_gsd.shape[0])
            elif getattr(router, "noise_std", 0) > 0:
                raise ValueError(
                    f"training (deterministic=False) with router {router_name(self.router)!r} "
                    f"and noise_std="
                    f"{router.noise_std} needs rngs={{'{GATING_RNG}': key}} in apply()"
                )

        def expert_fn(params_e, x_etd):
            return experts(params_e, x_etd, dtype=self.dtype)

        def moe_fn(router_inputs, expert_params, x_in_gsd, keys_g, run_experts):
            """Route, dispatch, run the experts (through `run_experts`), combine: the part of
            the layer an exchange may run per device, on that device's groups. `router_inputs`
            is (router params, router state or None): every device gets both whole."""
            router_params, state = router_inputs
            routing = router(
                router_params,
                x_in_gsd,
                rng=keys_g,
                deterministic=deterministic,
                **({"state": state} if stateful else {}),
            )
            metrics = dict(routing.metrics)
            # Every layer reports it, whatever the router (plugins need not compute it).
            metrics.setdefault("no_expert_fraction", routing.no_expert_fraction())
            # Checked before the einsum path turns blocks into buffers: a BlockRouting's blocks
            # vary in number with the load, and an exchange that moves buffers between devices
            # (all-to-all) needs one static shape; experts where the tokens are take any.
            if (
                isinstance(routing, vmoe_routing.BlockRouting)
                and run_experts is not run_local_experts
            ):
                raise ValueError(
                    f"router {router_name(self.router)!r} routes without a capacity "
                    "(BlockRouting): its experts run where the tokens are, so it cannot use "
                    f"an exchange that moves buffers between devices "
                    f"({type(self.exchange).__name__}, e.g. the 'expert' sharding strategy: an "
                    "all-to-all carries one static shape, and the number of blocks per expert "
                    "varies with the load); allowed: the 'data' or 'fsdp' strategy, or none"
                )
            if self.dispatch_path == "einsum" and isinstance(routing, vmoe_routing.BlockRouting):
                routing = routing.to_routing()  # capacity S: the slow, obvious reference
            if self.dispatch_path == "einsum" and isinstance(routing, vmoe_routing.Routing):
                routing = routing.to_dense()
            x_gsd = x_in_gsd.astype(self.dtype)
            if isinstance(routing, vmoe_routing.BlockRouting):
                y_gsd = self._run_blocks(expert_fn, expert_params, x_gsd, routing)
            else:
                x_gecd = self._round_buffers(vmoe_routing.dispatch(x_gsd, routing))
                y_gecd = run_experts(expert_fn, expert_params, x_gecd)
                y_gsd = vmoe_routing.combine(self._round_buffers(y_gecd), routing)
            stats = {
                "aux_loss": jnp.asarray(routing.aux_loss, jnp.float32),
                "aux_losses": dict(routing.aux_losses),
                "metrics": metrics,
            }
            return y_gsd, stats

        # At init the exchange is skipped: the parameters do not depend on it, and a sample batch
        # (often one image) need not split into as many groups as the exchange has devices.
        exchange = None if self.is_initializing() else self.exchange
        y_gsd, stats = exchange_or_local(exchange)(
            moe_fn, (router_params, router_state), expert_params, x_in_gsd, keys_g
        )
        if (
            stateful
            and not deterministic
            and not self.is_initializing()
            and self.is_mutable_collection(ROUTER_STATE)
        ):
            # stats are the batch's (joined over devices by the exchange): the same everywhere.
            new_state = router.update_state(router_state, stats["metrics"])
            state_variable.value = jax.lax.stop_gradient(new_state)
        y_gsd = y_gsd + self._branches(x_in_gsd, d)
        y_gsd = nn.Dropout(self.dropout_rate)(y_gsd, deterministic=deterministic)
        return MoeOutput(
            output=y_gsd.reshape(x.shape).astype(self.dtype),
            aux_loss=stats["aux_loss"],
            aux_losses=stats["aux_losses"],
            metrics=stats["metrics"],
        )

    def _branches(self, x_gsd: Array, d: int) -> Array | float:
        """The sum of the variants' branches on every token (0.0 when there is none): dense
        computations beside the routed experts, e.g. shared experts."""
        variants = [(n, v) for n, v in make_variants(self.variants) if is_branch(v)]
        if not variants:
            return 0.0
        shape = self.layer_shape()
        total = 0.0
        for name, variant in variants:
            if name in (ROUTER_KEY, EXPERTS_KEY):
                raise ValueError(f"a variant may not be named {name!r} (the layer's own params)")
            specs = sorted(variant.param_specs(d, shape).items())

            def init(key, specs=specs):
                return {
                    n: spec.init(jax.random.fold_in(key, i), spec.shape, self.param_dtype)
                    for i, (n, spec) in enumerate(specs)
                }

            params = self.param(name, init)
            y = variant(params, x_gsd.astype(self.dtype), shape=shape, dtype=self.dtype)
            if y.shape != x_gsd.shape:
                raise ValueError(
                    f"MoE layer variant {name!r} returned shape {y.shape} for tokens of shape "
                    f"{x_gsd.shape}; a branch must keep the shape"
                )
            total = total + y.astype(self.dtype)
        return total

    def _run_blocks(self, expert_fn, expert_params, x_gsd, routing):
        """Experts on [B, b, D] blocks, each block with its expert's params gathered."""
        x_bbd = self._round_buffers(vmoe_routing.dispatch(x_gsd, routing))
        params_b = jax.tree.map(lambda p: p[routing.block_expert], expert_params)
        y_bbd = expert_fn(params_b, x_bbd)
        return vmoe_routing.combine(self._round_buffers(y_bbd), routing)
