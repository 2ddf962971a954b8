"""The entry point module: `[project.entry-points.vmoe] expert_choice = "...plugin"`."""

from __future__ import annotations

import vmoe_routing
from vmoe_router_expert_choice.router import ExpertChoiceRouter


@vmoe_routing.hookimpl
def vmoe_routers():
    return {"expert_choice": ExpertChoiceRouter}
