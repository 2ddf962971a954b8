"""Shipped training configs, found by name (`vmoe-train --config=digits_vmoe`) or by path.

Each module has `get_config() -> ml_collections.ConfigDict` and a docstring saying what it
trains and how long it takes. `base.py` holds the fields every config has, with their meaning.
"""
