"""One small registry class, timm-style: names resolve to factories.

    @ATTACKS.register("pgd")
    class PGD: ...

    ATTACKS.get("pgd")        # -> PGD (the registered object)
    ATTACKS.get(PGD)          # -> PGD (objects pass through)
    ATTACKS.names()           # -> ["pgd", ...]

An unknown name raises ``RegistryError`` -- an ``InputError`` (so the CLI reports it as
bad input, exit 2), also a ``KeyError`` and a ``ValueError`` -- whose message lists every
valid name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from robustkit.errors import InputError

T = TypeVar("T")


class RegistryError(InputError, KeyError):
    """Unknown or duplicate registry name. The message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str | None = None) -> Callable[[T], T]:
        key = _norm(name)

        def deco(obj: T) -> T:
            if key in self._items and self._items[key] is not obj:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._items[key] = obj
            doc = help or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._help[key] = doc
            return obj

        return deco

    def get(self, name_or_object: str | T) -> T:
        if not isinstance(name_or_object, str):
            return name_or_object
        key = _norm(name_or_object)
        if key not in self._items:
            valid = ", ".join(self.names()) or "(none registered)"
            raise RegistryError(f"unknown {self.kind} {name_or_object!r}; valid {self.kind}s: {valid}")
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def help(self, name: str) -> str:
        return self._help.get(_norm(name), "")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _norm(name) in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


MODELS: Registry[Callable[..., Any]] = Registry("model")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
ATTACKS: Registry[Any] = Registry("attack")
DEFENSES: Registry[Any] = Registry("defense")
CERTIFIERS: Registry[Any] = Registry("certifier")
