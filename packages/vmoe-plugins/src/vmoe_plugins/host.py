"""The plugin host: one pluggy project ("vmoe"), one entry-point group ("vmoe"), lazy loading.

Every vmoe package adds the hookspecs of what it owns (routing: `vmoe_routers`; layers: expert
types and sharding strategies; data: datasets and preprocessing ops; ...) to one shared
`pluggy.PluginManager`, and registers its built-ins through those same hooks. Third-party
packages plug in through the entry-point group "vmoe":

    [project.entry-points.vmoe]
    my_router = "my_package.plugin"      # a module with @vmoe_plugins.hookimpl functions

Entry points are loaded lazily, on the first lookup. A plugin that fails to import is reported
(a `PluginImportWarning` naming its entry point and distribution, and `plugin_errors()`), and
the other plugins still load.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import threading
import types
import warnings

import pluggy

PROJECT = "vmoe"
ENTRY_POINT_GROUP = "vmoe"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PluginImportWarning(UserWarning):
    """A plugin's entry point could not be loaded or registered; the other plugins still are."""


@dataclasses.dataclass(frozen=True)
class PluginError:
    """A plugin that could not be used, and why."""

    plugin: str  # entry point "name = module" (with its distribution) or plugin name
    error: str


class _Host:
    """The shared plugin manager plus what we learnt loading entry points."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.pm = pluggy.PluginManager(PROJECT)
        self.entry_points_loaded = False
        self.errors: list[PluginError] = []
        self.labels: dict[str, str] = {}  # plugin name -> how to tell the user where it came from
        self.generation = 0  # bumped on every (un)registration; registries rebuild on change


_host: _Host | None = None
_spec_modules: list[types.ModuleType] = []
_builtin_plugins: list[tuple[str, object]] = []


def get_host() -> _Host:
    """The current host (created on first use, with every package's hookspecs and built-ins)."""
    global _host
    if _host is None:
        host = _Host()
        for module in _spec_modules:
            host.pm.add_hookspecs(module)
        for name, plugin in _builtin_plugins:
            _register_builtin_in(host, name, plugin)
        _host = host
    return _host


def _register_builtin_in(host: _Host, name: str, plugin: object) -> None:
    if host.pm.is_registered(plugin):  # already loaded as its package's entry point
        return
    host.pm.register(plugin, name=name)
    host.labels[name] = f"{name} (built-in)"
    host.generation += 1


def add_hookspecs(module: types.ModuleType) -> None:
    """Adds a package's hookspecs module to the shared manager (each package does this once)."""
    if module not in _spec_modules:
        _spec_modules.append(module)
        if _host is not None:
            _host.pm.add_hookspecs(module)


def register_builtin(name: str, plugin: object) -> None:
    """Registers a package's built-in plugin; it survives `reset()`."""
    if all(existing != name for existing, _ in _builtin_plugins):
        _builtin_plugins.append((name, plugin))
        if _host is not None:
            with _host.lock:
                _register_builtin_in(_host, name, plugin)


def plugin_manager() -> pluggy.PluginManager:
    """The shared pluggy manager, with the installed entry points loaded."""
    load_entry_points()
    return get_host().pm


def load_entry_points() -> None:
    """Imports and registers every "vmoe" entry point once; failures are reported, not raised."""
    host = get_host()
    with host.lock:
        if host.entry_points_loaded:
            return
        host.entry_points_loaded = True
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(entry_point, "dist", None)
            origin = f" from {dist.name} {dist.version}" if dist is not None else ""
            label = f'"{entry_point.name} = {entry_point.value}"{origin}'
            try:
                plugin = entry_point.load()
                if host.pm.is_registered(plugin):
                    continue
                host.pm.register(plugin, name=entry_point.name)
            except Exception as error:  # a broken plugin must not take the others down
                report(host, f"entry point {label}", f"{type(error).__name__}: {error}")
                continue
            host.labels[entry_point.name] = f"{entry_point.name} (entry point {label})"
        host.generation += 1


def report(host: _Host, plugin: str, error: str) -> None:
    """Records a plugin failure and warns about it once."""
    host.errors.append(PluginError(plugin, error))
    warnings.warn(f"Error loading vmoe plugin {plugin}: {error}", PluginImportWarning, stacklevel=3)


def plugin_errors() -> list[PluginError]:
    """Plugins that failed to import or whose hooks raised, in the order they were met."""
    load_entry_points()
    return list(get_host().errors)


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Registers a plugin object (a module or any object with @hookimpl methods) at run time.

    Use entry points to ship a plugin; use this in notebooks, scripts and tests.
    Returns the plugin's name (for `unregister_plugin`).
    """
    load_entry_points()
    host = get_host()
    with host.lock:
        registered = host.pm.register(plugin, name=name)
        if registered is None:
            raise ValueError(f"plugin {name or plugin!r} is blocked and cannot be registered")
        host.labels[registered] = registered
        host.generation += 1
        return registered


def unregister_plugin(name: str) -> None:
    """Removes a plugin registered under `name`."""
    host = get_host()
    with host.lock:
        if host.pm.get_plugin(name) is None:
            known = sorted(n for n, _ in host.pm.list_name_plugin())
            raise ValueError(f"no plugin named {name!r} is registered; registered: {known}")
        host.pm.unregister(name=name)
        host.generation += 1


def list_plugins() -> dict[str, list[str]]:
    """Registered plugins (with where they came from) -> the vmoe hooks each implements."""
    pm = plugin_manager()
    host = get_host()
    return {
        host.labels.get(name, name): sorted(c.name for c in pm.get_hookcallers(plugin) or [])
        for name, plugin in pm.list_name_plugin()
        if plugin is not None
    }


def reset() -> None:
    """Forgets every plugin except the built-ins; entry points load again on the next lookup."""
    global _host
    _host = None
