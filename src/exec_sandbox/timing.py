"""Milliseconds since a ``time.perf_counter()`` reading: the unit of every ``*_ms`` timing field."""

from __future__ import annotations

import time

__all__ = ["elapsed_ms"]


def elapsed_ms(start: float) -> float:
    """Milliseconds from ``start`` (a ``time.perf_counter()`` value) to now."""
    return (time.perf_counter() - start) * 1000.0
