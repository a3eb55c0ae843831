"""Lazy package exports (PEP 562), shared by the ``smartvm`` and ``exec_sandbox`` packages.

Importing one layer (say ``smartvm.qemu``) must not pay for every other layer's imports
(pyroute2, httpx, all pydantic models); the package ``__init__`` maps each public name to the
module that defines it and imports that module on first attribute access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, namespace: dict[str, Any], names: Mapping[str, str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return ``(__getattr__, __dir__)`` for ``package`` resolving ``names`` (name -> module)."""
    listing = sorted(public)

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # cache: the next access is a plain global lookup
        return value

    def __dir__() -> list[str]:
        return listing

    return __getattr__, __dir__
