"""The one plugin registry: names -> factories for prompt sources and rewards, with the packages that register
more on import (the Shapes world) and `"package.module:attribute"` references to user code."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

Factory = TypeVar("Factory", bound=Callable[..., Any])


class Registry(Generic[Factory]):
    """Factories by name, each with optional attributes (e.g. a prompt source's default held-out reward).

    Args:
        kind: what is registered, for messages ("prompt source", "reward").
        plugin_packages: packages imported once, when a name is not found, because they register more.
        error: the exception type an unknown name raises.
    """

    def __init__(self, kind: str, plugin_packages: tuple[str, ...], error: type[Exception] = ValueError) -> None:
        self.kind, self.plugin_packages, self.error = kind, plugin_packages, error
        self._factories: dict[str, Factory] = {}
        self._attributes: dict[str, dict[str, Any]] = {}
        self._plugins_imported = False

    def register(self, name: str, **attributes: Any) -> Callable[[Factory], Factory]:
        """Decorator registering `factory` under `name`, with `attributes` (read back with `attribute`)."""

        def decorator(factory: Factory) -> Factory:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            self._attributes[name] = attributes
            return factory

        return decorator

    def discard(self, name: str) -> None:
        """Forget `name` (a function registered again under the same name in one session: the latest wins)."""
        self._factories.pop(name, None)
        self._attributes.pop(name, None)

    def _import_plugins(self) -> None:
        if not self._plugins_imported:
            self._plugins_imported = True
            for package in self.plugin_packages:
                importlib.import_module(package)

    def __contains__(self, name: str) -> bool:
        if name not in self._factories:
            self._import_plugins()
        return name in self._factories

    def names(self) -> list[str]:
        """Every registered name, the plugins' included, sorted."""
        self._import_plugins()
        return sorted(self._factories)

    def unknown(self, name: str, label: str = "registered") -> Exception:
        """The error for an unknown `name`, suggesting the nearest registered one."""
        close = difflib.get_close_matches(name, self._factories, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"{label}: {', '.join(sorted(self._factories))}"
        return self.error(f"unknown {self.kind} {name!r} ({hint})")

    def get(self, name: str) -> Factory:
        """The factory registered as `name`; raises `error` naming the nearest registered name."""
        if name not in self:
            raise self.unknown(name)
        return self._factories[name]

    def attribute(self, name: str, key: str, default: Any = None) -> Any:
        """An attribute `name` was registered with, or `default`."""
        return self._attributes.get(name, {}).get(key, default) if name in self else default


def import_reference(reference: str, kind: str) -> Any:
    """The object named by `"package.module:attribute"` (the attribute may be dotted); `kind` names it in errors."""
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} of {kind} {reference!r}: {error}") from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r} ({kind} {reference!r})")
        target = getattr(target, part)
    return target
