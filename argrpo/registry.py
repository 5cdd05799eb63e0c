"""One registry for every named, pluggable thing (rewards, detectors, rollout engines, image tokenizers, layout and
size presets, CLI commands), so each has the same rules:

- ``@REG.register("name")`` (or ``REG.add("name", obj)``) refuses a name that is already taken;
- ``REG.lookup("name")`` imports the registry's built-in modules on the first miss (so importing a package stays
  light and an optional dependency only matters to whoever asks for that entry), then raises a one-line
  :class:`~argrpo.errors.UnknownNameError` that lists the registered names;
- where the registry allows plugins, ``REG.lookup("package.module:attr")`` imports the user's module. That runs the
  user's code, by design.

A registry reads like a dict of what is registered so far (``REG["name"]``, ``"name" in REG``, ``sorted(REG)``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from argrpo.errors import UnknownNameError, UserError

T = TypeVar("T")


class PluginImportError(UserError, ValueError):
    """A ``package.module:attr`` plugin path that does not import or has no such attribute."""


def import_object(path: str, what: str = "plugin") -> Any:
    """``package.module:attr`` (``attr`` may be dotted) -> the attribute. Importing the module runs the user's code.

    Errors name ``what`` and the path, e.g. ``reward 'mypkg:score': cannot import module 'mypkg' (...)``.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PluginImportError(f"{what} {path!r}: expected 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginImportError(f"{what} {path!r}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginImportError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one ``kind`` (the word used in errors: ``"reward"``, ``"rollout engine"``, ...).

    Args:
        kind: what an entry is, for messages.
        builtins: where the built-in entries are registered: ``{name: module}`` (that module is imported when
            ``name`` is asked for; the names count as known before import), or a sequence of modules (all imported
            on the first miss), or a callable returning that sequence.
        plugins: whether ``lookup`` accepts ``package.module:attr``.
    """

    def __init__(self, kind: str, builtins: Mapping[str, str] | Sequence[str] | Callable[[], Sequence[str]] = (),
                 plugins: bool = False):
        self.kind = kind
        self.plugins = plugins
        self._builtins = builtins
        self._entries: dict[str, T] = {}
        self._loaded = False

    # ---- registration ----------------------------------------------------------------------------------------------
    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name``; a name that is taken is a ``ValueError``."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"{self.kind} name must be a non-empty string without ':', got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered (by {self._entries[name]!r})")
        self._entries[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`; returns the object unchanged."""

        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def pop(self, name: str, *default: Any) -> T:
        """Remove an entry (tests register temporary ones)."""
        return self._entries.pop(name, *default)

    # ---- lookup ----------------------------------------------------------------------------------------------------
    def lookup(self, name: str, where: str | None = None) -> T:
        """The entry registered as ``name`` (built-ins imported on demand), or a plugin's attribute where allowed.

        ``where`` (a file, a config key) starts the error message of an unknown name."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {name!r}")
        if self.plugins and ":" in name:
            return import_object(name, self.kind)
        if name not in self._entries:
            self._import_builtins(name)
        if name not in self._entries:
            hint = " (or name a plugin as 'package.module:attr')" if self.plugins else ""
            prefix = f"{where}: " if where else ""
            raise UnknownNameError(f"{prefix}unknown {self.kind} {name!r}; registered: {self.names()}{hint}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Every name this registry knows, built-ins included (importing them where that costs nothing to ask)."""
        if isinstance(self._builtins, Mapping):
            return sorted(set(self._entries) | set(self._builtins))
        self._import_builtins(None)
        return sorted(self._entries)

    def _import_builtins(self, name: str | None) -> None:
        if isinstance(self._builtins, Mapping):
            modules = [self._builtins[name]] if name in self._builtins else []
        elif self._loaded:
            return
        else:
            modules = list(self._builtins() if callable(self._builtins) else self._builtins)
            self._loaded = True
        for module in modules:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name == module:  # the built-in module itself is gone: nothing registers there
                    continue
                what = f"{self.kind} {name!r}" if name else f"built-in {self.kind} module {module!r}"
                raise ImportError(f"{what} needs a package that is missing: {e.name}") from e

    # ---- mapping view of what is registered so far -----------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
