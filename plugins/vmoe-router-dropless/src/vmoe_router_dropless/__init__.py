"""vmoe-router-dropless: top-K routing without a capacity, as a vmoe router plugin.

Installed, it registers the router "dropless" through the "vmoe" entry point group only;
`vmoe_routing.get_router("dropless", num_experts=8, k=2)` then works, and so does
`--config.model.moe.router=dropless` in vmoe-train.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_router_dropless.router import DroplessRouter, block_layout

__version__ = importlib.metadata.version("vmoe-router-dropless")

__all__ = ["DroplessRouter", "__version__", "block_layout"]
