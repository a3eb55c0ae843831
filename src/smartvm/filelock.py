"""``FileLock``: an ``fcntl.flock`` on one lock file, shared by the caches that several processes use
(exec_sandbox's L1 snapshot cache and L2 package layers).

The lock file is created ``0600`` with ``O_NOFOLLOW`` in a directory verified private first
(:func:`smartvm.hostfs.ensure_private_dir`; :class:`~smartvm.hostfs.UnsafePathError` otherwise).
Waiting polls instead of blocking in a thread: a cancelled waiter leaves no thread behind that would
take the lock later and never drop it. Locks belong to the open file description, so two
``FileLock`` objects on one path exclude each other within one process too.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from pathlib import Path

from smartvm.hostfs import ensure_private_dir

__all__ = ["FileLock"]

_POLL_S = 0.01


class FileLock:
    """An ``fcntl.flock`` on ``path``, taken without blocking the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, *, shared: bool) -> bool:
        """Take the lock now if free (True); False when another holder has it."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held")
        ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        return True

    async def acquire(self, *, shared: bool, timeout: float | None = None) -> bool:
        """Wait for the lock; False when ``timeout`` seconds passed first (None: wait for ever)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.try_acquire(shared=shared):
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the description drops the flock
