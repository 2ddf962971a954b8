"""vmoe-router-expert-choice: expert-choice routing as a vmoe router plugin.

Installed, it registers the router "expert_choice" through the "vmoe" entry point group only;
`vmoe_routing.get_router("expert_choice", num_experts=8)` then works, and so does
`--config.model.moe.router=expert_choice` in vmoe-train.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_router_expert_choice.router import ExpertChoiceRouter, expert_choice_metrics

__version__ = importlib.metadata.version("vmoe-router-expert-choice")

__all__ = ["ExpertChoiceRouter", "__version__", "expert_choice_metrics"]
