"""vmoe-router-aux-free: auxiliary-loss-free load balancing (DeepSeek-V3) as a vmoe router plugin.

Installed, it registers the router "aux_free" through the "vmoe" entry point group only;
`vmoe_routing.get_router("aux_free", num_experts=8)` then works, and so does
`MoeLayer(router="aux_free")`, which keeps the router's balancing bias in the flax collection
`router_state`.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_router_aux_free.router import BALANCED_RTOL, BIAS_RULES, AuxFreeRouter, bias_step

__version__ = importlib.metadata.version("vmoe-router-aux-free")

__all__ = ["BALANCED_RTOL", "BIAS_RULES", "AuxFreeRouter", "__version__", "bias_step"]
