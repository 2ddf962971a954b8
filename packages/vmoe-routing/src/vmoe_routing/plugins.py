"""The vmoe plugin system: one pluggy project, one entry-point group, registries of named factories.

Every vmoe package adds the hookspecs of what it owns (routing: `vmoe_routers`; layers: expert
types and sharding strategies; ...) to one shared `pluggy.PluginManager` for the project "vmoe".
Third-party packages plug in through the entry-point group "vmoe":

    [project.entry-points.vmoe]
    my_router = "my_package.plugin"      # a module with @vmoe_routing.hookimpl functions

Entry points are loaded lazily, on the first registry lookup. A plugin that fails to import is
reported (a `PluginImportWarning` naming its entry point, and `plugin_errors()`), and the other
plugins still load. Built-ins register through the same hooks as third-party plugins.

A `Registry` turns one hook into a name -> factory table: every implementation of the hook
returns a mapping, the mappings are merged, and a name claimed by two plugins is an error that
names both. Plugins registered at run time (`register_plugin`) show up in the next lookup.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import inspect
import threading
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import pluggy

PROJECT = "vmoe"
ENTRY_POINT_GROUP = "vmoe"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

T = TypeVar("T")


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


def _get_host() -> _Host:
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
    return _get_host().pm


def load_entry_points() -> None:
    """Imports and registers every "vmoe" entry point once; failures are reported, not raised."""
    host = _get_host()
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
                _report(host, f"entry point {label}", f"{type(error).__name__}: {error}")
                continue
            host.labels[entry_point.name] = f"{entry_point.name} (entry point {label})"
        host.generation += 1


def _report(host: _Host, plugin: str, error: str) -> None:
    host.errors.append(PluginError(plugin, error))
    warnings.warn(f"Error loading vmoe plugin {plugin}: {error}", PluginImportWarning, stacklevel=3)


def plugin_errors() -> list[PluginError]:
    """Plugins that failed to import or whose hooks raised, in the order they were met."""
    load_entry_points()
    return list(_get_host().errors)


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Registers a plugin object (a module or any object with @hookimpl methods) at run time.

    Use entry points to ship a plugin; use this in notebooks, scripts and tests.
    Returns the plugin's name (for `unregister_plugin`).
    """
    load_entry_points()
    host = _get_host()
    with host.lock:
        registered = host.pm.register(plugin, name=name)
        if registered is None:
            raise ValueError(f"plugin {name or plugin!r} is blocked and cannot be registered")
        host.labels[registered] = registered
        host.generation += 1
        return registered


def unregister_plugin(name: str) -> None:
    """Removes a plugin registered under `name`."""
    host = _get_host()
    with host.lock:
        if host.pm.get_plugin(name) is None:
            known = sorted(n for n, _ in host.pm.list_name_plugin())
            raise ValueError(f"no plugin named {name!r} is registered; registered: {known}")
        host.pm.unregister(name=name)
        host.generation += 1


def list_plugins() -> dict[str, list[str]]:
    """Registered plugins (with where they came from) -> the vmoe hooks each implements."""
    pm = plugin_manager()
    host = _get_host()
    return {
        host.labels.get(name, name): sorted(c.name for c in pm.get_hookcallers(plugin) or [])
        for name, plugin in pm.list_name_plugin()
        if plugin is not None
    }


def reset() -> None:
    """Forgets every plugin except the built-ins; entry points load again on next lookup."""
    global _host
    _host = None


@dataclasses.dataclass(frozen=True)
class _Entry(Generic[T]):
    factory: Callable[..., T]
    plugin: str


class Registry(Generic[T]):
    """Name -> factory table gathered from one hook, e.g. `Registry("vmoe_routers", "router")`.

    The hook takes no arguments and returns a mapping of names to factories (callables that take
    the options as keyword arguments).
    """

    def __init__(self, hook_name: str, kind: str) -> None:
        self.hook_name = hook_name
        self.kind = kind
        self._cache: tuple[_Host, int, dict[str, _Entry[T]]] | None = None

    def _entries(self) -> dict[str, _Entry[T]]:
        load_entry_points()
        host = _get_host()
        with host.lock:
            if self._cache is not None and self._cache[:2] == (host, host.generation):
                return self._cache[2]
            entries: dict[str, _Entry[T]] = {}
            hook = getattr(host.pm.hook, self.hook_name)
            for impl in hook.get_hookimpls():  # registration order
                label = host.labels.get(impl.plugin_name, impl.plugin_name)
                try:
                    table = impl.function()
                    if not isinstance(table, Mapping):
                        raise TypeError(f"returned {type(table).__name__}, not a mapping")
                except Exception as error:
                    _report(host, f"{label} ({self.hook_name})", f"{type(error).__name__}: {error}")
                    continue
                for name, factory in table.items():
                    if name in entries:
                        raise ValueError(
                            f"{self.kind} name {name!r} is claimed by two plugins: "
                            f"{entries[name].plugin} and {label}; uninstall or unregister one"
                        )
                    entries[name] = _Entry(factory, label)
            self._cache = (host, host.generation, entries)
            return entries

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries())

    def provider(self, name: str) -> str:
        """Which plugin registered `name`."""
        return self._lookup(name).plugin

    def factory(self, name: str) -> Callable[..., T]:
        return self._lookup(name).factory

    def _lookup(self, name: str) -> _Entry[T]:
        entries = self._entries()
        if name not in entries:
            hint = difflib.get_close_matches(str(name), entries, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            failed = plugin_errors()
            broken = (
                f"; plugins that failed to load: {[e.plugin for e in failed]}" if failed else ""
            )
            raise ValueError(
                f"unknown {self.kind} {name!r}{maybe}; installed: {sorted(entries)}{broken}"
            )
        return entries[name]

    def create(self, name: str, /, **options: Any) -> T:
        """Calls the factory registered as `name` with `options`, checking their names first."""
        factory = self.factory(name)
        _check_options(factory, options, f"{self.kind} {name!r}")
        return factory(**options)


def _check_options(factory: Callable[..., Any], options: Mapping[str, Any], what: str) -> None:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without signatures: let the call decide
        return
    kinds = {p.kind for p in parameters.values()}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return
    allowed = [n for n, p in parameters.items() if p.kind != inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {what}; allowed: {allowed}")
    missing = [
        n
        for n, p in parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and n not in options
    ]
    if missing:
        raise ValueError(f"missing required option(s) {missing} for {what}")
