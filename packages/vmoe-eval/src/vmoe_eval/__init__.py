"""vmoe-eval: accuracy, few-shot linear transfer, capacity/K sweeps and routing analysis of
trained vmoe runs, as Python functions, evaluator plugins and the `vmoe-eval` command.

    run = vmoe_eval.load_run("runs/digits")
    vmoe_eval.get_evaluator("fewshot", shots=(1, 5)).evaluate(run)
    points = vmoe_eval.sweep(run)                      # BPR vs vanilla across capacities, K
    analysis = vmoe_eval.routing_analysis(run)         # expert x class, positions, NMI
"""

from __future__ import annotations

import importlib.metadata

from vmoe_eval import evaluators as _evaluators
from vmoe_eval.capacity_sweep import plot_sweep, sweep, write_sweep
from vmoe_eval.evaluators import (
    EVALUATORS,
    Accuracy,
    EvalCallback,
    Evaluator,
    FewShot,
    available_evaluators,
    get_evaluator,
)
from vmoe_eval.fewshot import choose_l2, fewshot_accuracy, fit_linear
from vmoe_eval.loading import LoadedRun, forward, load_run, with_routing
from vmoe_eval.routing_stats import (
    LayerRouting,
    RoutingAnalysis,
    normalized_mutual_information,
    routing_analysis,
    write_routing,
)

__version__ = importlib.metadata.version("vmoe-eval")

_evaluators.register()

__all__ = [
    "EVALUATORS",
    "Accuracy",
    "EvalCallback",
    "Evaluator",
    "FewShot",
    "LayerRouting",
    "LoadedRun",
    "RoutingAnalysis",
    "__version__",
    "available_evaluators",
    "choose_l2",
    "fewshot_accuracy",
    "fit_linear",
    "forward",
    "get_evaluator",
    "load_run",
    "normalized_mutual_information",
    "plot_sweep",
    "routing_analysis",
    "sweep",
    "with_routing",
    "write_routing",
    "write_sweep",
]
