"""The entry point module: `[project.entry-points.vmoe] dropless = "...plugin"`."""

from __future__ import annotations

import vmoe_routing
from vmoe_router_dropless.router import DroplessRouter


@vmoe_routing.hookimpl
def vmoe_routers():
    return {"dropless": DroplessRouter}
