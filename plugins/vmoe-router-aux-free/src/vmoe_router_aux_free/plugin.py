"""The entry point module: `aux_free = "vmoe_router_aux_free.plugin"` in the group `vmoe`."""

from __future__ import annotations

import vmoe_routing
from vmoe_router_aux_free.router import AuxFreeRouter


@vmoe_routing.hookimpl
def vmoe_routers():
    return {"aux_free": AuxFreeRouter}
