"""Cleanup that finishes once begun, even when the caller is cancelled.

Undo work (killing a process, deleting a half-made overlay, removing a TAP) must not be cut
short by a cancellation that arrives meanwhile: a half-done undo leaks exactly what it was
meant to remove. :func:`shielded` runs such work to its end and only then lets the caller's
cancellation through, so ``asyncio.timeout`` and task groups still see it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["shielded"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")


async def shielded(aw: Awaitable[_T]) -> _T:
    """Await ``aw`` to completion even if the caller is cancelled meanwhile; then re-raise the cancel.

    Without a cancellation this returns ``aw``'s result or raises its exception. With one (any
    number of them), ``aw`` still runs to its end and the caller's ``CancelledError`` is raised
    afterwards, never swallowed; an exception ``aw`` raised in that case is logged, because
    the cancellation takes precedence.
    """
    task = asyncio.ensure_future(aw)
    cancel: asyncio.CancelledError | None = None
    while not task.done():
        try:
            # Unlike shield(), wait() never raises the task's own error here, only our cancel.
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            # Also when ``task`` finished in the same loop turn: the cancel was meant for us.
            cancel = cancel or exc
    if cancel is None:
        return task.result()
    if not task.cancelled() and (error := task.exception()) is not None:
        _log.warning("cleanup failed while its caller was being cancelled: %r", error, exc_info=error)
    raise cancel
