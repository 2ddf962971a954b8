"""vmoe-eval: accuracy, few-shot, capacity sweeps, routing analysis (skeleton; see README.md)."""

from __future__ import annotations

import importlib.metadata

__version__ = importlib.metadata.version("vmoe-eval")

__all__ = ["__version__"]
