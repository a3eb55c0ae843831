"""Waiting on the event loop in tests by iterations, never by time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["until"]


async def until(predicate: Callable[[], object], *, spins: int = 1000) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded by iterations, not by time)."""
    for _ in range(spins):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")
