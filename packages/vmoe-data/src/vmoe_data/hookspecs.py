"""Hooks owned by vmoe-data. This module is the reference for writing a data plugin.

A plugin is a module (or object) with `@vmoe_plugins.hookimpl` functions named like the hooks
below, registered through the "vmoe" entry-point group or `vmoe_plugins.register_plugin`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from vmoe_plugins import hookspec


@hookspec
def vmoe_datasets() -> Mapping[str, Callable[..., object]]:
    """Datasets this plugin provides, by name.

    Called once, on the first dataset lookup after plugins change (not per example). Every
    implementation's mapping is merged; a name returned by two plugins is an error naming both.

    Returns:
      name -> factory. `factory(**options)` returns a `vmoe_data.Dataset`. A name looked up as
      `"name:argument"` (like `"tfds:cifar10"`) calls the factory with the argument as its first
      parameter.

    Example::

        @vmoe_plugins.hookimpl
        def vmoe_datasets():
            return {"my_images": lambda root="/data": vmoe_data.Dataset(...)}
    """
    raise NotImplementedError  # a hookspec has no body; pluggy calls the implementations


@hookspec
def vmoe_preprocess_ops() -> Mapping[str, Callable[..., object]]:
    """Preprocessing ops this plugin provides, by the name used in pp specs.

    Called once, on the first op lookup after plugins change (parsing a spec such as
    `"decode|resize(32)|my_op(0.5)"`, not per example). Every implementation's mapping is
    merged; a name returned by two plugins is an error naming both.

    Returns:
      name -> factory. `factory(*args, **kwargs)` (the arguments written in the spec) checks
      them, raising ValueError for bad ones, and returns an op: a callable
      `op(example: dict, rng: numpy.random.Generator) -> dict` that returns a new example
      (never mutates its input) and draws any randomness from `rng`. An op marked with
      `vmoe_data.batch_op` gets a whole batch (each value has a leading batch axis B) instead.

    Example::

        @vmoe_plugins.hookimpl
        def vmoe_preprocess_ops():
            def invert():
                def op(example, rng):
                    return {**example, "image": 255 - example["image"]}
                return op
            return {"invert": invert}
    """
    raise NotImplementedError
