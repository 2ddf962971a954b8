"""Hooks owned by vmoe-layers: expert types, sharding strategies and MoE layer variants.

This module is the reference for writing a vmoe-layers plugin. Ship a module with
`@vmoe_plugins.hookimpl` functions (`vmoe_routing.hookimpl` is the same object) named like the
hooks below and point an entry point of the group "vmoe" at it
(`[project.entry-points.vmoe] my_plugin = "my_package.plugin"`), or register it at run time with
`vmoe_plugins.register_plugin(module)`. What a factory returns is checked to have the members of
the protocol (`ExpertType`, `ShardingStrategy`); the error names the plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vmoe_plugins import hookspec


@hookspec
def vmoe_expert_types() -> Mapping[str, Callable[..., Any]]:
    """Expert types (the feed-forward function of one expert) this plugin provides, by name.

    Called on the first expert-type lookup after plugins change (not per model call). Every
    implementation's mapping is merged; a name returned by two plugins is an error naming both.

    Returns:
      name -> factory. `factory(**options)` returns an expert type (see
      `vmoe_layers.ExpertType`): an object with `param_specs(d_model)` -> {param name:
      `ParamSpec(shape, init)`} describing ONE expert's parameters (the MoE layer stacks E of
      them along a new leading axis), and `__call__(params, x_etd, *, dtype)` applying E experts
      at once: params with a leading E axis, x [E, T, D] -> [E, T, D]. The models call every
      factory with `mlp_dim=...` plus the user's options.

    Example::

        @vmoe_plugins.hookimpl
        def vmoe_expert_types():
            return {"my_ffn": MyExpertType}
    """
    raise NotImplementedError  # a hookspec has no body; pluggy calls the implementations


@hookspec
def vmoe_sharding_strategies() -> Mapping[str, Callable[..., Any]]:
    """Sharding strategies (how a model is laid out over a device mesh) this plugin provides.

    Called on the first strategy lookup after plugins change. Mappings are merged as for
    `vmoe_expert_types`.

    Returns:
      name -> factory. `factory(**options)` (options such as `mesh_shape` and `devices`) returns a
      strategy (see `vmoe_layers.ShardingStrategy`): it has a `mesh`, `param_specs(params)` (a
      PartitionSpec for every parameter), `batch_spec()` (the PartitionSpec of the leading batch
      axis) and `exchange` (None, or an `ExpertExchange`: where MoE layers route their groups
      and how expert buffers reach experts on other devices).

    Example::

        @vmoe_plugins.hookimpl
        def vmoe_sharding_strategies():
            return {"my_layout": MyStrategy}
    """
    raise NotImplementedError


@hookspec
def vmoe_moe_variants() -> Mapping[str, Callable[..., Any]]:
    """MoE layer variants this plugin provides, by name (see `vmoe_layers.variants`).

    Returns:
      name -> factory. `factory(**options)` returns a variant with `configure(shape) -> shape`
      (reshape the routed part: a `vmoe_layers.LayerShape` of E, the experts' width and the
      router's options), or a branch every token goes through beside the routed experts
      (`param_specs(d_model, shape)` -> {param name: `ParamSpec`}, `__call__(params, x, *,
      shape, dtype)` -> an array of x's shape, added to the layer's output), or both. Its FLOPs
      are counted from what it runs (`vmoe_layers.layer_flops`).

    Example::

        @vmoe_plugins.hookimpl
        def vmoe_moe_variants():
            return {"shared_experts": SharedExperts}
    """
    raise NotImplementedError  # a hookspec has no body; pluggy calls the implementations
