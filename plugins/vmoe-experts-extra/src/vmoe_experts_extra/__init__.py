"""vmoe-experts-extra: more expert types for vmoe MoE layers, as a plugin.

Installed, it registers the expert types "identity", "low_rank" and "mixed_width" through the
"vmoe" entry point group only; `vmoe_layers.MoeLayer(..., expert_type="low_rank")` then works.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_experts_extra.experts import IdentityExperts, LowRankExperts, MixedWidthExperts

__version__ = importlib.metadata.version("vmoe-experts-extra")

__all__ = ["IdentityExperts", "LowRankExperts", "MixedWidthExperts", "__version__"]
