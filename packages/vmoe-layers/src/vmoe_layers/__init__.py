"""vmoe-layers: the MoE layer, expert types, ViT / V-MoE models and sharding strategies (skeleton; see README.md)."""

from __future__ import annotations

import importlib.metadata

__version__ = importlib.metadata.version("vmoe-layers")

__all__ = ["__version__"]
