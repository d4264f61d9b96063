"""Registries: named entries (dataset readers, probe kinds) that the modules of one package add.

Each entry is registered by the module that defines it (a decorator or a call at its top level),
and the registry imports every module of its package the first time it is asked, so adding an
entry is adding a module: no list elsewhere names it. A name asked for that no module registered
is a ParamsError listing the known names. The stage table's code dependencies follow the same
rule (`xtra.pipeline.dag.DISCOVERED`: every module of such a package).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Generic, TypeVar

from xtra.errors import ParamsError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name (listed sorted); `package`'s modules are imported on first use."""

    def __init__(self, what: str, package: str) -> None:
        self.what, self.package = what, package  # e.g. "dataset kind", "xtra.data.readers"
        self._entries: dict[str, T] = {}
        self._discovered = False

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; another entry under a taken name is an error."""
        if self._entries.get(name, entry) is not entry:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget `name` (a test's own entries)."""
        self._entries.pop(name, None)

    def _discover(self) -> None:
        if not self._discovered:
            self._discovered = True
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> list[str]:
        """The registered names, sorted (the same order whichever module was imported first)."""
        self._discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        self._discover()
        if name not in self._entries:
            raise ParamsError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
