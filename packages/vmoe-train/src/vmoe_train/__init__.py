"""vmoe-train: trainer, configs, orbax checkpoints, metrics, CLI (skeleton; see README.md).

`tune_cpu_malloc()` (vmoe_train.host): have glibc keep freed memory for reuse in CPU training
loops; opt-in, call it first thing in a script.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_train.host import tune_cpu_malloc

__version__ = importlib.metadata.version("vmoe-train")

__all__ = ["__version__", "tune_cpu_malloc"]
