"""vmoe-router-soft: Soft MoE routing as a vmoe router plugin.

Installed, it registers the router "soft" through the "vmoe" entry point group only;
`vmoe_routing.get_router("soft", num_experts=8)` then works, and so does
`--config.model.moe.router=soft` in vmoe-train.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_router_soft.router import SoftRouter, slot_similarity

__version__ = importlib.metadata.version("vmoe-router-soft")

__all__ = ["SoftRouter", "__version__", "slot_similarity"]
