"""The entry point module: `[project.entry-points.vmoe] hash = "vmoe_router_hash.plugin"`."""

from __future__ import annotations

import vmoe_routing
from vmoe_router_hash.router import HashRouter


@vmoe_routing.hookimpl
def vmoe_routers():
    return {"hash": HashRouter}
