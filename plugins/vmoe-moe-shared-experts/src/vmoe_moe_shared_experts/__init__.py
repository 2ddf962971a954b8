"""vmoe-moe-shared-experts: shared experts (DeepSeekMoE) as a vmoe MoE layer variant plugin.

Installed, it registers the variant "shared_experts" through the "vmoe" entry point group only;
`vmoe_layers.MoeLayer(..., variants={"shared_experts": {"num_shared": 1}})` then adds N experts
every token goes through to the routed ones.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_moe_shared_experts.shared import SharedExperts, stacked_spec

__version__ = importlib.metadata.version("vmoe-moe-shared-experts")

__all__ = ["SharedExperts", "__version__", "stacked_spec"]
