"""vmoe-plugins: the plugin host every vmoe package plugs into.

One pluggy project ("vmoe") and one entry-point group ("vmoe"). Each vmoe package adds its own
hookspecs (routers, expert types, sharding strategies, datasets, preprocessing ops, ...) and
registers its built-ins through them; a third-party package is a module of `@hookimpl`
functions named in an entry point:

    [project.entry-points.vmoe]
    my_plugin = "my_package.plugin"

    import vmoe_plugins
    ROUTERS = vmoe_plugins.Registry("vmoe_routers", "router", members=("init", "__call__"))
    ROUTERS.create("top_k", num_experts=8)   # lookup, option-name check, protocol check

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
from vmoe_plugins.registry import Registry, missing_members

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
    "register_builtin",
    "register_plugin",
    "reset",
    "unregister_plugin",
]
