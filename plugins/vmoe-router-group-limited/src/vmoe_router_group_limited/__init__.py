"""vmoe-router-group-limited: group-limited top-K routing (DeepSeek-V3's n_group / topk_group)
as a vmoe router plugin.

Installed, it registers the router "group_limited" through the "vmoe" entry point group only;
`vmoe_routing.get_router("group_limited", num_experts=8, num_expert_groups=4, topk_groups=2)`
then works, and so does `MoeLayer(router="group_limited", router_options={...})`.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_router_group_limited.router import (
    GROUP_SCORES,
    GroupLimitedRouter,
    group_scores,
    kept_experts,
)

__version__ = importlib.metadata.version("vmoe-router-group-limited")

__all__ = ["GROUP_SCORES", "GroupLimitedRouter", "__version__", "group_scores", "kept_experts"]
