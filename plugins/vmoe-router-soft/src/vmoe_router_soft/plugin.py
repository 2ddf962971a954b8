"""The entry point module: `[project.entry-points.vmoe] soft = "vmoe_router_soft.plugin"`."""

from __future__ import annotations

import vmoe_routing
from vmoe_router_soft.router import SoftRouter


@vmoe_routing.hookimpl
def vmoe_routers():
    return {"soft": SoftRouter}
