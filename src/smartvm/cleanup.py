"""Cleanup that runs in reverse, once, and finishes once begun, even when the caller is cancelled.

Every host-side effect registers its undo on an :class:`UndoStack` when it is made; the
stack runs them newest first, once, and a failing step does not stop the rest.

Undo work (killing a process, deleting a half-made overlay, removing a TAP) must not be cut
short by a cancellation that arrives meanwhile: a half-done undo leaks exactly what it was
meant to remove. :func:`shielded` runs such work to its end and only then lets the caller's
cancellation through, so ``asyncio.timeout`` and task groups still see it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self, TypeVar

__all__ = ["AsyncClosing", "AsyncService", "UndoStack", "UndoStep", "shielded"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

UndoStep = Callable[[], Awaitable[None]]


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


class UndoStack:
    """Undo steps of the host changes made so far; :meth:`run` pops and runs them newest first."""

    def __init__(self, owner: str, *, log: logging.Logger = _log) -> None:
        self._owner = owner  # names whose cleanup a log line is about
        self._log = log
        self._steps: list[tuple[str, UndoStep]] = []

    def push(self, what: str, step: UndoStep) -> None:
        """Register ``step`` (described by ``what``) to undo a change that was just made."""
        self._steps.append((what, step))

    def __len__(self) -> int:
        return len(self._steps)

    async def run(self) -> list[tuple[str, Exception]]:
        """Run every registered step once, newest first; return the ones that failed.

        A failing step is logged and the rest still run. A step cut short by a cancellation
        does not stop the rest either: the cancellation is re-raised after the last step
        (wrap the call in :func:`shielded` so that no step is cut short at all).
        """
        failures: list[tuple[str, Exception]] = []
        cancel: asyncio.CancelledError | None = None
        while self._steps:
            what, step = self._steps.pop()
            try:
                await step()
            except asyncio.CancelledError as exc:
                cancel = cancel or exc
            except Exception as exc:  # keep undoing the rest; the caller decides how to report
                self._log.warning("%s: undo step %r failed: %r", self._owner, what, exc)
                failures.append((what, exc))
        if cancel is not None:
            raise cancel
        return failures


class AsyncClosing:
    """``async with obj:`` gives ``obj`` and awaits ``obj.aclose()`` on the way out, whatever happened.

    The one ``async with`` shape of the project (anyio's ``aclose``): subclasses define ``aclose``
    (idempotent, safe in any state) and inherit the context manager.
    """

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class AsyncService(AsyncClosing):
    """:class:`AsyncClosing` that also awaits ``start()`` (idempotent) on the way in."""

    async def start(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self
