"""Forwarding guest console lines to an ``on_boot_log`` callback while a VM boots."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from exec_sandbox.callbacks import TextCallback, call_safely

__all__ = ["BootLogForwarder"]

logger = logging.getLogger(__name__)


class BootLogForwarder:
    """One background task passing console lines to a callback; :meth:`stop` once the agent is up,
    :meth:`aclose` (idempotent) on teardown."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._task: asyncio.Task[None] | None = None

    def start(self, lines: AsyncIterator[str], callback: TextCallback) -> None:
        self._task = asyncio.get_running_loop().create_task(self._forward(lines, callback), name=self._name)

    @staticmethod
    async def _forward(lines: AsyncIterator[str], callback: TextCallback) -> None:
        async for line in lines:
            await call_safely(callback, line, what="on_boot_log", logger=logger)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
