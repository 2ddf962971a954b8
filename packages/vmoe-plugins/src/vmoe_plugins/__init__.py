"""vmoe-plugins: the plugin host every vmoe package plugs into.

One pluggy project ("vmoe") and one entry-point group ("vmoe"). Each vmoe package adds its own
hookspecs (routers, expert types, sharding strategies, datasets, preprocessing ops, ...) and
registers its built-ins through them; a third-party package is a module of `@hookimpl`
functions named in an entry point:

    [project.entry-points.vmoe]
    my_plugin = "my_package.plugin"

A package that owns a hook (declared with `@hookspec`, added with `add_hookspecs`) looks names
up in a `Registry` built from it (a made-up "greeter" hook here; the README runs it in full):

    import vmoe_plugins
    GREETERS = vmoe_plugins.Registry("vmoe_greeters", "greeter", members=("greet",))
    GREETERS.create("hello", name="vmoe")   # lookup, option-name check, protocol check

The option checks in `vmoe_plugins.checks` are the one rule for integers, numbers, bools,
strings and choices that every package applies to its options.
"""

from __future__ import annotations

import importlib.metadata

from vmoe_plugins.checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_str,
    is_bool,
    is_int,
    is_number,
)
from vmoe_plugins.docs import readme_examples, run_readme_examples
from vmoe_plugins.host import (
    ENTRY_POINT_GROUP,
    PROJECT,
    PluginError,
    PluginImportWarning,
    add_hookspecs,
    hookimpl,
    hookspec,
    list_plugins,
    load_entry_points,
    plugin_errors,
    plugin_manager,
    register_builtin,
    register_plugin,
    reset,
    unregister_plugin,
)
from vmoe_plugins.registry import Registry, missing_members, with_article

__version__ = importlib.metadata.version("vmoe-plugins")

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROJECT",
    "PluginError",
    "PluginImportWarning",
    "Registry",
    "__version__",
    "add_hookspecs",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_str",
    "hookimpl",
    "hookspec",
    "is_bool",
    "is_int",
    "is_number",
    "list_plugins",
    "load_entry_points",
    "missing_members",
    "plugin_errors",
    "plugin_manager",
    "readme_examples",
    "register_builtin",
    "register_plugin",
    "reset",
    "run_readme_examples",
    "unregister_plugin",
    "with_article",
]
