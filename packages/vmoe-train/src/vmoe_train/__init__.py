"""vmoe-train: the trainer, configs, orbax checkpoints, metrics and the training CLI (skeleton; see README.md)."""

from __future__ import annotations

import importlib.metadata

__version__ = importlib.metadata.version("vmoe-train")

__all__ = ["__version__"]
