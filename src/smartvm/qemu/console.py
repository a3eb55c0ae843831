"""Guest console capture: a bounded ring buffer fed by QEMU's stdout, plus line subscriptions.

QEMU's serial console is wired to its stdout (``-chardev stdio``), so a pipe read
by one asyncio task sees everything from the first byte. The buffer keeps the
last ``limit`` bytes; callers that want boot logs live subscribe with
:meth:`ConsoleBuffer.lines` or wait for a marker with :meth:`ConsoleBuffer.wait_for`.
The reader never stops draining the pipe, so a chatty guest cannot block QEMU.

Bounded whatever the guest prints: the tail buffer and the partial line hold ``limit`` bytes each,
and every subscriber queue at most ``_LINE_QUEUE_MAX`` lines and ``_LINE_QUEUE_CHARS`` characters
(a slow subscriber loses its oldest lines, counted in ``dropped_lines``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

__all__ = ["ConsoleBuffer"]

_LINE_QUEUE_MAX = 10_000
_LINE_QUEUE_CHARS = 1024 * 1024


class _LineQueue(asyncio.Queue[str | None]):
    """A subscriber's lines, bounded in count and characters (oldest dropped first)."""

    def __init__(self) -> None:
        super().__init__()
        self.chars = 0
        self.dropped_lines = 0

    def push(self, line: str) -> None:
        while not self.empty() and (self.qsize() >= _LINE_QUEUE_MAX
                                    or self.chars + len(line) > _LINE_QUEUE_CHARS):
            self.pop_nowait()
            self.dropped_lines += 1
        self.chars += len(line)
        self.put_nowait(line)

    def pop_nowait(self) -> str | None:
        item = self.get_nowait()
        self.chars -= len(item or "")
        return item


class ConsoleBuffer:
    """Last ``limit`` bytes of a console stream and a fan-out of complete lines."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        if limit <= 0:
            raise ValueError("console buffer limit must be positive")
        self.limit = limit
        self._buf = bytearray()
        self._partial = bytearray()
        self._subscribers: set[_LineQueue] = set()
        self._changed = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.total_bytes = 0

    def attach(self, reader: asyncio.StreamReader) -> None:
        """Start draining ``reader`` into the buffer (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(reader), name="qemu-console")

    async def _drain(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(4096):
                self.feed(chunk)
        finally:
            self.close()

    def feed(self, chunk: bytes) -> None:
        """Append bytes (also used when the console is restored or read from elsewhere)."""
        self.total_bytes += len(chunk)
        self._buf += chunk
        if len(self._buf) > self.limit:
            del self._buf[: len(self._buf) - self.limit]
        self._partial += chunk
        *complete, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest)
        if len(self._partial) > self.limit:  # a newline-free flood must not grow without bound
            del self._partial[: len(self._partial) - self.limit]
        for raw in complete:
            line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
            for queue in self._subscribers:
                queue.push(line)  # a slow subscriber loses old lines; QEMU is never blocked
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """Mark end of stream: subscribers finish, waiters stop waiting."""
        if self._closed:
            return
        self._closed = True
        for queue in self._subscribers:
            queue.put_nowait(None)
        self._changed.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def output(self) -> str:
        """The buffered tail of the console, decoded leniently."""
        return self._buf.decode("utf-8", errors="replace")

    async def lines(self) -> AsyncIterator[str]:
        """Yield complete console lines from now on until the console closes."""
        queue = _LineQueue()
        self._subscribers.add(queue)
        try:
            if self._closed:
                return
            while (line := await queue.get()) is not None:
                queue.chars -= len(line)
                yield line
        finally:
            self._subscribers.discard(queue)

    async def wait_for(self, pattern: str | re.Pattern[str], *, since: int = 0) -> re.Match[str]:
        """Wait until the buffered output (after byte offset ``since``) matches ``pattern``.

        Raises :class:`EOFError` when the console closes first. Wrap in a timeout.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        while True:
            dropped = self.total_bytes - len(self._buf)
            start = max(0, since - dropped)
            match = regex.search(self._buf[start:].decode("utf-8", errors="replace"))
            if match:
                return match
            if self._closed:
                raise EOFError(f"console closed before {regex.pattern!r} appeared")
            await self._changed.wait()

    async def wait_eof(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the stream to end; True when it did."""
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=timeout)
        return self._task is None or self._task.done()

    async def aclose(self) -> None:
        """Stop the reader task (the pipe is closed by the process owner)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            # asyncio.wait never raises the task's CancelledError, so our own cancellation still propagates
            await asyncio.wait([self._task])
        self.close()
