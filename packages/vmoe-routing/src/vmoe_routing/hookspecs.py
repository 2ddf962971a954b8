"""Hooks owned by vmoe-routing. This module is the reference for writing a router plugin."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from vmoe_routing.plugins import hookspec
from vmoe_routing.routers import Router


@hookspec
def vmoe_routers() -> Mapping[str, Callable[..., Router]]:
    """Routers this plugin provides, by name.

    Called once, on the first router lookup after plugins change (not per model call). Every
    implementation's mapping is merged; a name returned by two plugins is an error naming both.

    Returns:
      name -> factory. `factory(**options)` returns a router: an object with
      `init(rng, d_model) -> params` and `__call__(params, x_gsd, *, rng, deterministic)`
      returning a `vmoe_routing.Routing` (or `DenseRouting`). A frozen dataclass whose fields
      are the options is the simplest factory; options must include `num_experts`.

    Example::

        @vmoe_routing.hookimpl
        def vmoe_routers():
            return {"my_router": MyRouter}
    """
    raise NotImplementedError  # a hookspec has no body; pluggy calls the implementations
