"""vmoe-eval: accuracy, few-shot linear transfer, capacity/K sweeps and routing analysis of
trained vmoe runs, as Python functions, evaluator plugins and the `vmoe-eval` command.

    run = vmoe_eval.load_run("runs/digits")
    vmoe_eval.get_evaluator("fewshot", shots=(1, 5)).evaluate(run)
    points = vmoe_eval.sweep(run)                      # BPR vs vanilla across capacities, K
    analysis = vmoe_eval.routing_analysis(run)         # expert x class, positions, NMI
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

# Each public name and the module it comes from, imported on first use. The plugin host imports
# this package in every process that looks up a router or an expert type (the entry point
# `vmoe_eval._builtins` is a submodule); importing the evaluation code there would pull in
# vmoe-train, tensorflow-datasets and matplotlib (2.5 s) for nothing.
_EXPORTS = {
    "vmoe_eval.capacity_sweep": ("plot_sweep", "sweep", "write_sweep"),
    "vmoe_eval.evaluators": (
        "EVALUATORS",
        "Accuracy",
        "EvalCallback",
        "Evaluator",
        "FewShot",
        "available_evaluators",
        "get_evaluator",
    ),
    "vmoe_eval.fewshot": ("choose_l2", "fewshot_accuracy", "fit_linear"),
    "vmoe_eval.loading": ("LoadedRun", "forward", "load_run", "with_routing"),
    "vmoe_eval.routing_stats": (
        "LayerRouting",
        "RoutingAnalysis",
        "normalized_mutual_information",
        "routing_analysis",
        "write_routing",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # what type checkers and editors see: the same names (tests check it)
    from vmoe_eval.capacity_sweep import plot_sweep, sweep, write_sweep  # noqa: F401
    from vmoe_eval.evaluators import (  # noqa: F401 (re-exported)
        EVALUATORS,
        Accuracy,
        EvalCallback,
        Evaluator,
        FewShot,
        available_evaluators,
        get_evaluator,
    )
    from vmoe_eval.fewshot import choose_l2, fewshot_accuracy, fit_linear  # noqa: F401
    from vmoe_eval.loading import LoadedRun, forward, load_run, with_routing  # noqa: F401
    from vmoe_eval.routing_stats import (  # noqa: F401 (re-exported)
        LayerRouting,
        RoutingAnalysis,
        normalized_mutual_information,
        routing_analysis,
        write_routing,
    )

__version__ = importlib.metadata.version("vmoe-eval")
__all__ = sorted([*_MODULE_OF, "__version__"])


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'vmoe_eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
