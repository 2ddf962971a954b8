"""The entry point module: `[project.entry-points.vmoe] experts_extra = "...plugin"`."""

from __future__ import annotations

import vmoe_plugins
from vmoe_experts_extra.experts import IdentityExperts, LowRankExperts, MixedWidthExperts


@vmoe_plugins.hookimpl
def vmoe_expert_types():
    return {
        "identity": IdentityExperts,
        "low_rank": LowRankExperts,
        "mixed_width": MixedWidthExperts,
    }
