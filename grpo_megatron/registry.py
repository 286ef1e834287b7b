"""Name -> implementation tables, and the one place a "package.module:function" name is imported.

Losses, estimators, rewards, tools and rollout functions are each a Registry: a built-in is registered by
name (`@REG.register("name")`), a user's is given as "package.module:function" in the config and imported
on lookup. Lowest layer: imports nothing from the project but errors.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from grpo_megatron.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, ValueError):
    """A name that is neither registered nor an importable "package.module:function"."""


def is_import_path(name: str) -> bool:
    return ":" in name


def import_object(path: str, kind: str) -> Any:
    """The object `attr` of "package.module:attr"; UnknownNameError naming the path when it does not import."""
    module_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UnknownNameError(f"{kind} {path!r} cannot be imported ({exc}); give 'package.module:function' "
                               "importable from the run's environment") from None


class Registry(Generic[T]):
    """A named table of implementations of one kind (e.g. "policy loss")."""

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint  # how to add one, appended to the unknown-name message
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`: `@POLICY_LOSSES.register("grpo")`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        """The registered entry `name`, or the object a "package.module:function" name imports."""
        if name in self._entries:
            return self._entries[name]
        if is_import_path(name):
            return import_object(name, self.kind)
        known = ", ".join(entry or "''" for entry in self.names())
        raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}{self.hint}")

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries
