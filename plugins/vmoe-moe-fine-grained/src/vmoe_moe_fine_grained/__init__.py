"""vmoe-moe-fine-grained: fine-grained expert segmentation (DeepSeekMoE) as a vmoe MoE layer
variant.

Installed, it registers the variant "fine_grained" through the "vmoe" entry point group only;
`vmoe_layers.MoeLayer(..., variants={"fine_grained": {"m": 4}})` then builds E*m experts of width
H/m with K*m choices per token.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_moe_fine_grained.fine_grained import FineGrained

__version__ = importlib.metadata.version("vmoe-moe-fine-grained")

__all__ = ["FineGrained", "__version__"]
