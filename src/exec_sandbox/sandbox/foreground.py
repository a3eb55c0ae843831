"""Foreground activity: how many caller-facing operations (runs, session execs) are in flight.

Background work (warm-pool refills) asks it for a gap before starting, because on a small host
under TCG a VM restore takes a whole core for ~0.2 s and the caller's own VM and this process's
event loop need the cores at that moment. It never waits for ever: see ``wait_for_gap``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

__all__ = ["ForegroundActivity"]


class ForegroundActivity:
    """A counter of foreground operations in flight, with a wait for a moment without any."""

    def __init__(self) -> None:
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        return self._active

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count one foreground operation for the duration of the ``with`` block."""
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def wait_for_gap(self, max_wait_s: float) -> bool:
        """Wait until nothing is in flight, at most ``max_wait_s``; True if a gap came (under
        sustained load there may be none, and background work must still make progress)."""
        if self._active == 0:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait_s):
                await self._idle.wait()
                return True
        return False
