"""Hooks owned by vmoe-train: training callbacks and initialisation transforms. This module is the
reference for writing a plugin of either kind."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from vmoe_plugins import hookspec

if TYPE_CHECKING:  # no import at run time: vmoe_train.callbacks adds this module at its import
    from vmoe_train.callbacks import Callback, RunInfo
    from vmoe_train.init_rules import Transform


@hookspec
def vmoe_train_callbacks() -> Mapping[str, Callable[[RunInfo], Callback]]:
    """Training callbacks this plugin provides, by name.

    Called when a run starts, to look up the names in the config's `log.callbacks` tuple (and by
    `vmoe_train.callbacks.available_callbacks()`); not per step. Every implementation's mapping
    is merged; a name returned by two plugins is an error naming both. The built-ins
    ("progress", "jsonl", "tensorboard", "profile") come through this same hook.

    Returns:
      name -> factory. `factory(run)` gets the run's `vmoe_train.callbacks.RunInfo` (workdir,
      config, start_step, num_steps, is_main_process) and returns a callback: an object with
      every hook of `vmoe_train.callbacks.Callback` (`on_train_start`, `on_step_end`,
      `on_evaluate`, `on_eval`, `on_checkpoint`, `on_train_end`, `on_train_abort`; subclass
      `Callback` and override the ones you need, the others are no-ops). One that lacks a hook
      is refused with an error naming this plugin. The loop then calls `on_train_start(run)`, so
      a callback may open its files there. Metrics arrive as flat dicts of Python floats with
      "/"-separated names; only the main process (`run.is_main_process`) should write anything.
      `on_evaluate(step, variables, setup)` hands over the live model variables (params, and
      router state where the routers keep one) at each evaluation
      (valid only during the call; see `vmoe_train.callbacks` for the order of calls).

    Example::

        class PrintLoss(vmoe_train.callbacks.Callback):
            def __init__(self, run):
                self.main = run.is_main_process

            def on_step_end(self, step, metrics):
                if self.main:
                    print(step, metrics["train/loss"])


        @vmoe_plugins.hookimpl
        def vmoe_train_callbacks():
            return {"print_loss": PrintLoss}

    and `config.log.callbacks = ("progress", "print_loss")`.
    """
    raise NotImplementedError  # a hookspec has no body; pluggy calls the implementations


@hookspec
def vmoe_train_init_transforms() -> Mapping[str, Transform]:
    r"""Array transforms for initialisation rules (`vmoe_train.init_rules`), by name.

    Called when `vmoe_train.init_rules.apply_rules` looks up its rules' transform names (before
    any array is read), and by `vmoe_train.available_transforms()`; not per array. Every
    implementation's mapping is merged; a name returned by two plugins is an error naming both.
    The built-ins ("copy", "tile", "zoom", "drop") come through this same hook.

    Returns:
      name -> transform. `transform(x, target_shape, target_dtype)` gets one matched source
      array (host NumPy, as loaded), the target parameter's shape (a tuple of ints) and dtype,
      and returns the target's array, on the host (pure NumPy: the caller places the results).
      The result is cast to the dtype and must have the shape. For a source it cannot turn into
      that shape, raise ValueError saying what was wrong and what is allowed: it is reported
      with the rule, the source and the target paths, among every other problem of the call,
      in one `InitRulesError`; any other exception propagates with a note naming the rule.

    Example::

        def transpose(x, target_shape, target_dtype):
            if x.shape[::-1] != target_shape:
                raise ValueError(f"transpose turns {x.shape} into {x.shape[::-1]}")
            return x.T


        @vmoe_plugins.hookimpl
        def vmoe_train_init_transforms():
            return {"transpose": transpose}

    and the rule `(r"(.*)/kernel", r"\1/kernel", "transpose")` (a checkpoint of [out, in]
    kernels).
    """
    raise NotImplementedError  # a hookspec has no body; pluggy calls the implementations
