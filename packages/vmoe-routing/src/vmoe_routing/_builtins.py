"""The built-in routers, registered through the same hook as third-party plugins."""

from __future__ import annotations

from vmoe_plugins import hookimpl
from vmoe_routing.routers import BprRouter, TopKRouter


@hookimpl
def vmoe_routers():
    return {TopKRouter.name: TopKRouter, BprRouter.name: BprRouter}
