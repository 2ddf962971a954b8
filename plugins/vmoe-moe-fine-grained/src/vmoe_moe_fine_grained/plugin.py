"""The entry point module: `fine_grained = "vmoe_moe_fine_grained.plugin"` in the group `vmoe`."""

from __future__ import annotations

import vmoe_plugins
from vmoe_moe_fine_grained.fine_grained import FineGrained


@vmoe_plugins.hookimpl
def vmoe_moe_variants():
    return {"fine_grained": FineGrained}
