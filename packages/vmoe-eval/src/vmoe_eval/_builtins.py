"""The built-in evaluators (and the trainer callback that runs them), registered through the
same hooks as third-party plugins."""

from __future__ import annotations

from vmoe_plugins import hookimpl


@hookimpl
def vmoe_evaluators():
    # Imported when the hook is called, not at import: vmoe_eval.evaluators registers this module
    # at its own import, and must find the hookimpls here already defined, whichever is first.
    from vmoe_eval import evaluators

    return {"accuracy": evaluators.Accuracy, "fewshot": evaluators.FewShot}


@hookimpl
def vmoe_train_callbacks():
    from vmoe_eval import evaluators

    return {"evaluators": evaluators.EvalCallback.from_run}
