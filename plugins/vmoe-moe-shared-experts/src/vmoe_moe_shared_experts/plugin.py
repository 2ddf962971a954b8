"""The entry point module: `shared_experts = "vmoe_moe_shared_experts.plugin"` in the group
`vmoe`."""

from __future__ import annotations

import vmoe_plugins
from vmoe_moe_shared_experts.shared import SharedExperts


@vmoe_plugins.hookimpl
def vmoe_moe_variants():
    return {"shared_experts": SharedExperts}
