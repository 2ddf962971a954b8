"""vmoe-train: trainer, configs, orbax checkpoints, metrics, CLI (skeleton; see README.md)."""

from __future__ import annotations

import importlib.metadata

__version__ = importlib.metadata.version("vmoe-train")

__all__ = ["__version__"]
