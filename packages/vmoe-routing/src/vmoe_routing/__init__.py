"""vmoe-routing: routers for sparse Mixture-of-Experts in JAX.

Shape legend: G groups, S tokens per group, D model dim, E experts, C capacity, K choices per
token, N assignments per group.

    import vmoe_routing as vr
    router = vr.get_router("bpr", num_experts=8, k=2, capacity_factor=1.05)
    params = router.init(jax.random.key(0), d_model)
    routing = router(params, x_gsd, rng=key, deterministic=False)
    buffers_gecd = vr.dispatch(x_gsd, routing)          # [G, E, C, D]
    y_gsd = vr.combine(experts(buffers_gecd), routing)  # [G, S, D]
    loss = task_loss + routing.aux_loss
"""

from __future__ import annotations

import importlib.metadata

import vmoe_plugins
from vmoe_plugins import (
    PluginError,
    PluginImportWarning,
    Registry,
    hookimpl,
    hookspec,
    list_plugins,
    plugin_errors,
    register_plugin,
    unregister_plugin,
)
from vmoe_routing import _builtins, hookspecs
from vmoe_routing.capacity import compute_capacity
from vmoe_routing.decision import BlockRouting, DenseRouting, Routing
from vmoe_routing.dispatch import combine, dispatch
from vmoe_routing.losses import gshard_loss, importance_loss, load_loss, z_loss
from vmoe_routing.routers import (
    ROUTER_MEMBERS,
    ROUTER_STATE_MEMBERS,
    BprRouter,
    Router,
    StatefulRouter,
    TokenChoiceRouter,
    TopKRouter,
    check_tokens,
    gate_logits,
    has_state,
)
from vmoe_routing.shards import combine_over_shards, gate_noise, group_keys
from vmoe_routing.token_choice import (
    rank_within_expert,
    token_choice_metrics,
    token_choice_routing,
)

__version__ = importlib.metadata.version("vmoe-routing")

vmoe_plugins.add_hookspecs(hookspecs)
vmoe_plugins.register_builtin("vmoe_routing.builtins", _builtins)

# The router plugins of the vmoe repository (plugins/), each its own package: a config naming
# one of them while it is not installed is told which package to install.
PLUGIN_ROUTERS = {
    "hash": "vmoe-router-hash",
    "expert_choice": "vmoe-router-expert-choice",
    "dropless": "vmoe-router-dropless",
    "soft": "vmoe-router-soft",
    "aux_free": "vmoe-router-aux-free",
    "group_limited": "vmoe-router-group-limited",
}

ROUTERS: Registry[Router] = Registry(
    "vmoe_routers", "router", members=ROUTER_MEMBERS, known=PLUGIN_ROUTERS
)


def get_router(name: str, /, **options) -> Router:
    """The router registered as `name`, built with `options` (e.g. num_experts=8, k=2).

    What the plugin's factory returns is checked to have every member of the `Router` protocol
    (`ROUTER_MEMBERS`); a ValueError names the plugin, its entry point and what is missing.
    A router object is not a name: pass it to `MoeLayer(router=...)` (or `MoeConfig`,
    `create_model`) as it is.
    """
    if not isinstance(name, str):
        got = vmoe_plugins.with_article(type(name).__name__)
        raise ValueError(
            f"get_router takes a registered name; got {got} object: pass router objects to "
            "MoeLayer(router=...) / MoeConfig / create_model directly"
        )
    return ROUTERS.create(name, **options)


def available_routers() -> list[str]:
    """Names of every installed router (built-ins and plugins), sorted."""
    return ROUTERS.names()


__all__ = [
    "PLUGIN_ROUTERS",
    "ROUTERS",
    "ROUTER_MEMBERS",
    "ROUTER_STATE_MEMBERS",
    "BlockRouting",
    "BprRouter",
    "DenseRouting",
    "PluginError",
    "PluginImportWarning",
    "Registry",
    "Router",
    "Routing",
    "StatefulRouter",
    "TokenChoiceRouter",
    "TopKRouter",
    "__version__",
    "available_routers",
    "check_tokens",
    "combine",
    "combine_over_shards",
    "compute_capacity",
    "dispatch",
    "gate_logits",
    "gate_noise",
    "get_router",
    "group_keys",
    "gshard_loss",
    "has_state",
    "hookimpl",
    "hookspec",
    "importance_loss",
    "list_plugins",
    "load_loss",
    "plugin_errors",
    "rank_within_expert",
    "register_plugin",
    "token_choice_metrics",
    "token_choice_routing",
    "unregister_plugin",
    "z_loss",
]
