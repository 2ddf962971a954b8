"""vmoe-router-hash: a third-party-style vmoe router plugin (Hash Layers routing).

Installed, it registers the router "hash" through the "vmoe" entry point group only; nothing in
vmoe names it. `vmoe_routing.get_router("hash", num_experts=8)` then works.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_router_hash.router import HashRouter

__version__ = importlib.metadata.version("vmoe-router-hash")

__all__ = ["HashRouter", "__version__"]
