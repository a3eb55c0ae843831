"""A VMM child process that cannot outlive its owner.

The child runs in its own process group (so signals reach anything it forks)
and gets ``PR_SET_PDEATHSIG=SIGKILL`` (so it dies if the owning thread dies,
even on ``kill -9`` of the owner). Its stdout/stderr are drained continuously
into bounded tails, so a chatty VMM never blocks on a full pipe and errors can
quote what it said last.

Caveat: Linux delivers the parent-death signal when the *thread* that forked
the child exits, so spawn from the thread that runs the event loop (asyncio
does) and keep that thread alive for the VM's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections import deque
from collections.abc import Callable, Sequence

__all__ = ["ChildProcess"]

_log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_TAIL_LINES = 40


def _load_prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - every Linux libc has prctl
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


# Resolved before any fork: the child must not run the dynamic loader between fork and exec.
_PRCTL = _load_prctl()


def _make_preexec(owner_pid: int) -> Callable[[], None]:
    prctl = _PRCTL

    def preexec() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The owner may have died between fork() and prctl(): then nobody will ever signal us.
        if os.getppid() != owner_pid:
            os._exit(1)

    return preexec


class ChildProcess:
    """One spawned VMM process. Create with :meth:`spawn`; always finish with :meth:`aclose`."""

    def __init__(self, argv: Sequence[str], proc: asyncio.subprocess.Process) -> None:
        self.argv = list(argv)
        self._proc = proc
        self._stdout: deque[str] = deque(maxlen=_TAIL_LINES)
        self._stderr: deque[str] = deque(maxlen=_TAIL_LINES)
        self._readers = [
            asyncio.create_task(self._drain(proc.stdout, self._stdout)),
            asyncio.create_task(self._drain(proc.stderr, self._stderr)),
        ]

    @classmethod
    async def spawn(cls, argv: Sequence[str], *, env: dict[str, str] | None = None) -> ChildProcess:
        """Start ``argv``; OSError (e.g. FileNotFoundError, PermissionError) propagates to the caller."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_make_preexec(os.getpid()),
            env=env,
        )
        return cls(argv, proc)

    @staticmethod
    async def _drain(stream: asyncio.StreamReader | None, tail: deque[str]) -> None:
        if stream is None:
            return
        while True:
            line = await stream.readline()
            if not line:
                return
            tail.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def alive(self) -> bool:
        return self._proc.returncode is None

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def stdout_tail(self) -> str:
        return "\n".join(self._stdout)

    async def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if the process is still running after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            return None

    def signal_group(self, sig: int) -> None:
        """Signal the whole process group; a group that is already gone is not an error."""
        if not self.alive:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - group changed under us; fall back to the pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    async def aclose(self) -> int | None:
        """SIGKILL the group if still alive, reap it and stop the pipe readers. Idempotent."""
        self.signal_group(signal.SIGKILL)
        code = await self._proc.wait()
        # Readers end at EOF; a grandchild still holding the pipes must not keep us here.
        _done, pending = await asyncio.wait(self._readers, timeout=1.0)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return code
