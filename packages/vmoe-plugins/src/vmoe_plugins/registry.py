"""Named registries: one hook turned into a name -> factory table.

Every implementation of the hook returns a mapping of names to factories; the mappings are
merged, and a name claimed by two plugins is an error that names both. A registry may state the
members every object it creates must have (its protocol): what a plugin's factory returns is
checked, and a missing member is reported with the plugin it came from. Plugins registered at
run time show up in the next lookup.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from vmoe_plugins import host as _host

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class _Entry(Generic[T]):
    factory: Callable[..., T]
    plugin: str


class Registry(Generic[T]):
    """Name -> factory table gathered from one hook, e.g. `Registry("vmoe_routers", "router")`.

    Args:
      hook_name: the hook; it takes no arguments and returns {name: factory}.
      kind: what the registry holds, for messages ("router", "dataset", ...).
      members: attributes every created object must have (e.g. the members of its Protocol);
        `create` refuses an object that lacks any, naming the plugin and the missing members.
      known: name -> the distribution that provides it, for names of separately installed
        plugin packages: looking one up while it is not installed says what to pip install.
    """

    def __init__(
        self,
        hook_name: str,
        kind: str,
        members: Sequence[str] = (),
        known: Mapping[str, str] | None = None,
    ) -> None:
        self.hook_name = hook_name
        self.kind = kind
        self.members = tuple(members)
        self.known = dict(known or {})
        self._cache: tuple[Any, int, dict[str, _Entry[T]]] | None = None

    def _entries(self) -> dict[str, _Entry[T]]:
        _host.load_entry_points()
        host = _host.get_host()
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
                    _host.report(
                        host, f"{label} ({self.hook_name})", f"{type(error).__name__}: {error}"
                    )
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
        """Which plugin registered `name` (with its entry point and distribution)."""
        return self._lookup(name).plugin

    def factory(self, name: str) -> Callable[..., T]:
        """The factory registered as `name`."""
        return self._lookup(name).factory

    def missing_hint(self, name: str) -> str:
        """For a known plugin name that is not installed, the sentence saying what to install
        ("" otherwise)."""
        if name in self.known and name not in self._entries():
            dist = self.known[name]
            return (
                f"{self.kind} {name!r} comes with the plugin package {dist}, which is not "
                f"installed: pip install {dist}"
            )
        return ""

    def _lookup(self, name: str) -> _Entry[T]:
        entries = self._entries()
        if name not in entries:
            missing = self.missing_hint(str(name)) if isinstance(name, str) else ""
            if missing:
                raise ValueError(f"{missing}; installed: {sorted(entries)}")
            hint = difflib.get_close_matches(str(name), entries, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            failed = _host.plugin_errors()
            broken = (
                f"; plugins that failed to load: {[e.plugin for e in failed]}" if failed else ""
            )
            raise ValueError(
                f"unknown {self.kind} {name!r}{maybe}; installed: {sorted(entries)}{broken}"
            )
        return entries[name]

    def accepts(self, name: str, option: str) -> bool:
        """Whether the factory registered as `name` takes an option called `option`.

        Read from the factory's signature (True for a factory with **kwargs, or one without a
        signature). Lets a caller merge its defaults only into factories that have the option.
        """
        parameters = _parameters(self.factory(name))
        if parameters is None or any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            return True
        return option in parameters and parameters[option].kind != inspect.Parameter.VAR_POSITIONAL

    def create(self, name: str, /, **options: Any) -> T:
        """Calls the factory registered as `name` with `options` and checks what it returns."""
        entry = self._lookup(name)
        what = f"{self.kind} {name!r} from {entry.plugin}"
        _check_options(entry.factory, options, what)
        created = entry.factory(**options)
        self.check_members(created, what)
        return created

    def check_members(self, obj: Any, what: str) -> None:
        """Raises a ValueError naming `what` unless `obj` has every member of the protocol."""
        missing = missing_members(obj, self.members)
        if missing:
            raise ValueError(
                f"{what} is {with_article(type(obj).__name__)} without {missing}; "
                f"{with_article(self.kind)} must have {list(self.members)}"
            )


def with_article(word: str) -> str:
    """`word` after "a" or "an", by its first letter: "an Incomplete", "a TopKRouter"."""
    return f"{'an' if word[:1].lower() in tuple('aeiou') else 'a'} {word}"


def missing_members(obj: Any, members: Sequence[str]) -> list[str]:
    """The names in `members` that `obj` lacks (`__call__` counts only if obj is callable)."""
    return [m for m in members if (not callable(obj) if m == "__call__" else not hasattr(obj, m))]


def _parameters(factory: Callable[..., Any]) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without signatures: let the call decide
        return None


def _check_options(factory: Callable[..., Any], options: Mapping[str, Any], what: str) -> None:
    # Option names are checked against the factory's signature so that a typo is reported with
    # the allowed names, instead of a TypeError from deep inside the factory.
    parameters = _parameters(factory)
    if parameters is None:
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
