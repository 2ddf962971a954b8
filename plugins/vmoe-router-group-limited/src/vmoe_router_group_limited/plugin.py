"""The entry point module: `group_limited = "vmoe_router_group_limited.plugin"` in the group
`vmoe`."""

from __future__ import annotations

import vmoe_routing
from vmoe_router_group_limited.router import GroupLimitedRouter


@vmoe_routing.hookimpl
def vmoe_routers():
    return {"group_limited": GroupLimitedRouter}
