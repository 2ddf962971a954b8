"""vmoe-data: grain pipelines over tfds sources, the embedded offline digits dataset, preprocessing ops (skeleton; see README.md)."""

from __future__ import annotations

import importlib.metadata

__version__ = importlib.metadata.version("vmoe-data")

__all__ = ["__version__"]
