"""Makes the test helpers next to this file importable (pytest runs in importlib mode)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
