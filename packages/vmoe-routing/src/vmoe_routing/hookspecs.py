"""Hooks owned by vmoe-routing. This module is the reference for writing a router plugin."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from vmoe_plugins import hookspec
from vmoe_routing.routers import Router


@hookspec
def vmoe_routers() -> Mapping[str, Callable[..., Router]]:
    """Routers this plugin provides, by name.

    Called once, on the first router lookup after plugins change (not per model call). Every
    implementation's mapping is merged; a name returned by two plugins is an error naming both.

    Returns:
      name -> factory. `factory(**options)` returns a router: an object with every member of
      the `vmoe_routing.Router` protocol (`vmoe_routing.ROUTER_MEMBERS`):
        - `num_experts`: E;
        - `init(rng, d_model) -> params` (a pytree);
        - `__call__(params, x_gsd, *, rng=None, deterministic=True)` (rng: one key, or one
          key per group; draw noise with `vmoe_routing.gate_noise`) returning a
          `vmoe_routing.Routing` (or `DenseRouting` for dense mixing, `BlockRouting` for
          routing without a capacity);
        - `replace(**changes)`: a copy with some options changed (K or the capacity factor at
          inference).
      A router may also own state that gradients do not train (`vmoe_routing.StatefulRouter`):
      then it has `init_state(d_model) -> state` and `update_state(state, metrics) -> state`
      (`vmoe_routing.ROUTER_STATE_MEMBERS`, both or neither) and its `__call__` takes
      `state=`; vmoe-layers keeps the state and updates it after every training step from the
      batch's routing metrics.
      A router that lacks one is refused when it is created (`get_router`), with an error
      naming this plugin. Options must include `num_experts`. For token choice, subclass
      `vmoe_routing.TokenChoiceRouter` (a frozen dataclass whose fields are the options): it
      brings K, the capacity options, `replace` and `assign`.

    Example::

        @vmoe_routing.hookimpl
        def vmoe_routers():
            return {"my_router": MyRouter}
    """
    raise NotImplementedError  # a hookspec has no body; pluggy calls the implementations
