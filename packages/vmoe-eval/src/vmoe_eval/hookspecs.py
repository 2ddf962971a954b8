"""Hooks owned by vmoe-eval. This module is the reference for writing an evaluator plugin."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from vmoe_plugins import hookspec

if TYPE_CHECKING:  # no import at run time: vmoe_eval.evaluators adds this module at its import
    from vmoe_eval.evaluators import Evaluator


@hookspec
def vmoe_evaluators() -> Mapping[str, Callable[..., Evaluator]]:
    """Evaluators this plugin provides, by name.

    Called when an evaluator is looked up (`vmoe_eval.get_evaluator(name, **options)`, the
    trainer's "evaluators" callback, `available_evaluators()`); not per batch. Every
    implementation's mapping is merged; a name returned by two plugins is an error naming both.
    The built-ins ("accuracy", "fewshot") come through this same hook.

    Returns:
      name -> factory. `factory(**options)` takes the evaluator's options as keyword arguments
      (their names are checked against its signature before the call, so a typo is an error
      listing the allowed ones; check their values in the factory and raise a one-line
      ValueError naming the option) and returns an evaluator: an object with

      - `name`: a str, the name results are reported under;
      - `evaluate(run) -> dict[str, float]`: `run` is a `vmoe_eval.loading.LoadedRun` (config,
        model, dataset, parameters laid out for this host's devices); the result is a flat dict
        of Python floats with "/"-separated keys ("test/accuracy", "fewshot/5shot/mean").

      One that lacks either is refused with an error naming this plugin. With several processes
      (`jax.distributed`) `evaluate` runs in every process, on the same `run`, and must return
      the same results in each: iterate with `vmoe_eval.loading.forward`, whose batches and
      `to_host` outputs are global (every process sees every example), and weigh per-example
      values by `batch["mask"]` (False on padding) so each example counts exactly once.

    Example::

        import numpy as np
        import vmoe_plugins
        from vmoe_eval import loading


        class MeanLogit:
            name = "mean_logit"

            def __init__(self, split="test"):
                self.split = split

            def evaluate(self, run):
                total = count = 0.0
                for out, batch in loading.forward(run, self.split):
                    logits = loading.to_host(out.logits).max(axis=-1)
                    total += float(np.sum(logits * batch["mask"]))
                    count += float(batch["mask"].sum())
                return {f"{self.split}/mean_logit": total / count}


        @vmoe_plugins.hookimpl
        def vmoe_evaluators():
            return {"mean_logit": MeanLogit}

    then `vmoe_eval.get_evaluator("mean_logit", split="validation").evaluate(run)`, or
    `config.eval.evaluators = ("accuracy", ("mean_logit", {"split": "validation"}))` for the
    trainer's "evaluators" callback.
    """
    raise NotImplementedError  # a hookspec has no body; pluggy calls the implementations
