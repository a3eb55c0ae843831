"""Child processes that cannot outlive their owner, and the ladder that stops them.

Every long-lived helper process (Firecracker, QEMU, qemu-storage-daemon) is spawned here:

* in its own process group (``new_session=True``: its own session too), so signals reach
  anything it forks (QEMU's ``exec:`` migration ``cat``, for instance);
* with ``PR_SET_PDEATHSIG`` (SIGKILL by default), so it dies even on ``kill -9`` of the owner;
* with umask 077, so whatever it creates (guest RAM files, overlays, snapshots) is private;
* with stdout/stderr drained continuously into bounded line tails (or handed to the caller's
  own reader), so a chatty child never blocks on a full pipe and errors can quote it.

Short-lived tools (``qemu-img``, ``firecracker --version``) run through :func:`run_tool`, which
kills and reaps the tool on timeout or cancellation.

:func:`stop_ladder` is the one shutdown ladder: graceful (a callable the owner supplies,
e.g. QMP ``quit`` or Firecracker's SendCtrlAltDel) -> SIGTERM -> SIGKILL, with timeouts.

Caveat: Linux delivers the parent-death signal when the *thread* that forked the child
exits, so spawn from the thread that runs the event loop (asyncio does) and keep that
thread alive for the child's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from smartvm.cleanup import shielded

__all__ = [
    "DEFAULT_TAIL_LINES",
    "PRIVATE_UMASK",
    "ChildProcess",
    "OutputMode",
    "StreamConsumer",
    "ToolResult",
    "can_raise_priority",
    "pdeathsig_preexec",
    "pid_alive",
    "run_tool",
    "set_process_nice",
    "signal_group",
    "stop_ladder",
]

_log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_THP_DISABLE = 41
DEFAULT_TAIL_LINES = 40
PRIVATE_UMASK = 0o077
"""Children create files readable and writable by our uid only."""

StreamConsumer = Callable[[asyncio.StreamReader], object]
"""Takes over a pipe (e.g. ``ConsoleBuffer.attach``); it must keep draining it."""

OutputMode = Literal["tail", "devnull"] | StreamConsumer
"""``"tail"``: keep the last lines; ``"devnull"``: discard; a callable: hand the pipe to it."""


def _load_prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - every Linux libc has prctl
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


# Resolved before any fork: the child must not run the dynamic loader between fork and exec.
_PRCTL = _load_prctl()


def pdeathsig_preexec(
    *, sig: int = signal.SIGKILL, process_group: bool = False, thp_disable: bool = False, nice: int = 0
) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get ``sig`` when its parent thread dies.

    ``process_group``: also move the child into a process group of its own (use this or
    ``start_new_session=True``, not both). ``thp_disable``: ``PR_SET_THP_DISABLE`` (kept across
    ``execve``), so the child's ``MADV_HUGEPAGE`` regions are backed by 4 KiB pages: a region then
    costs the memory it touches, not whole 2 MiB pages (QEMU's TCG code buffer: ~2 MiB per VM).
    ``nice``: added to the child's nice value before ``execve``, so every thread it creates inherits
    it (nice is per thread on Linux: renicing a running process reaches only the threads named).
    """
    prctl = _PRCTL
    owner = os.getpid()

    def preexec() -> None:
        if process_group:
            os.setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
            if thp_disable:
                prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)
        if nice:
            os.nice(nice)
        # The owner may have died between fork() and prctl(): then nobody will ever signal us.
        if os.getppid() != owner:
            os._exit(1)

    return preexec


_CAP_SYS_NICE = 23


def can_raise_priority() -> bool:
    """True when this process may lower nice values again (root or CAP_SYS_NICE)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def set_process_nice(pid: int, nice: int) -> bool:
    """Set the nice value of every thread of ``pid``; False if the process is gone or it is not
    allowed (raising priority needs CAP_SYS_NICE)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return False
    ok = True
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            continue  # a thread that just ended
        except PermissionError:
            ok = False
    return ok


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists (a zombie counts); a pid we may not signal exists too."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid``; a group that is already gone is not an error."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # pragma: no cover - group changed under us; fall back to the pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _pipe(mode: OutputMode) -> int:
    return asyncio.subprocess.DEVNULL if mode == "devnull" else asyncio.subprocess.PIPE


class ChildProcess:
    """One spawned child in its own process group. Create with :meth:`spawn`; finish with :meth:`aclose`."""

    def __init__(
        self,
        argv: Sequence[str],
        proc: asyncio.subprocess.Process,
        *,
        stdout: OutputMode = "tail",
        stderr: OutputMode = "tail",
        tail_lines: int = DEFAULT_TAIL_LINES,
    ) -> None:
        self.argv = list(argv)
        self._proc = proc
        self._stdout: deque[str] = deque(maxlen=tail_lines)
        self._stderr: deque[str] = deque(maxlen=tail_lines)
        self._readers: list[asyncio.Task[None]] = []
        for mode, stream, tail in ((stdout, proc.stdout, self._stdout), (stderr, proc.stderr, self._stderr)):
            if stream is None:
                continue
            if mode == "tail":
                self._readers.append(asyncio.create_task(self._drain(stream, tail)))
            elif callable(mode):
                mode(stream)

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        new_session: bool = False,
        pdeathsig: int = signal.SIGKILL,
        stdout: OutputMode = "tail",
        stderr: OutputMode = "tail",
        tail_lines: int = DEFAULT_TAIL_LINES,
        thp_disable: bool = False,
        nice: int = 0,
        pass_fds: Sequence[int] = (),
        umask: int = PRIVATE_UMASK,
    ) -> ChildProcess:
        """Start ``argv`` (stdin from /dev/null); OSError (e.g. FileNotFoundError) propagates.

        ``umask``: the child's (default 077): every file it creates (RAM file, overlay, snapshot,
        socket) is private from creation.
        ``new_session``: ``setsid`` (own session and process group) instead of ``setpgid``.
        ``thp_disable``: no transparent huge pages in the child (see :func:`pdeathsig_preexec`).
        ``nice``: the child (and all its threads) starts at this nice value.
        ``pass_fds``: descriptors the child inherits under the same numbers (all others are closed).
        """
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=_pipe(stdout),
            stderr=_pipe(stderr),
            preexec_fn=pdeathsig_preexec(
                sig=pdeathsig, process_group=not new_session, thp_disable=thp_disable, nice=nice
            ),
            start_new_session=new_session,
            env=dict(env) if env is not None else None,
            pass_fds=tuple(pass_fds),
            umask=umask,
        )
        return cls(argv, proc, stdout=stdout, stderr=stderr, tail_lines=tail_lines)

    @staticmethod
    async def _drain(stream: asyncio.StreamReader, tail: deque[str]) -> None:
        while line := await stream.readline():
            tail.append(line.decode(errors="replace").rstrip())

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

    @overload
    async def wait(self) -> int: ...

    @overload
    async def wait(self, timeout: float | None) -> int | None: ...

    async def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if the process is still running after ``timeout`` seconds."""
        if timeout is None:
            return await self._proc.wait()
        try:
            async with asyncio.timeout(timeout):
                return await self._proc.wait()
        except TimeoutError:
            return None

    def signal_group(self, sig: int) -> None:
        """Signal the whole process group, unless the child is already reaped."""
        if self.alive:
            signal_group(self._proc.pid, sig)

    async def settle_output(self, timeout: float = 1.0) -> None:
        """Wait up to ``timeout`` seconds for the tail readers to reach EOF (after an exit)."""
        pending = [task for task in self._readers if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def aclose(self) -> int:
        """SIGKILL the group if still alive, reap it and stop the tail readers. Idempotent."""
        self.signal_group(signal.SIGKILL)
        code = await self._proc.wait()
        # Readers end at EOF; a grandchild still holding the pipes must not keep us here.
        await self.settle_output(1.0)
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return code


async def stop_ladder(
    proc: ChildProcess,
    *,
    graceful: Callable[[], Awaitable[bool]] | None = None,
    timeout: float,
    kill_timeout: float | None = None,
    what: str = "child",
    log: logging.Logger = _log,
) -> bool:
    """Graceful -> SIGTERM -> SIGKILL to ``proc``'s group; True once it has exited.

    ``graceful`` asks the child to exit and returns whether to wait ``timeout`` seconds for
    it (False: the ask did not go out, escalate now). SIGTERM waits ``timeout`` seconds,
    SIGKILL ``kill_timeout`` (None: until it exits). False only if it survived SIGKILL.
    """
    if not proc.alive:
        return True
    if graceful is not None and await graceful():
        if await proc.wait(timeout) is not None:
            return True
        log.info("%s pid %s still running %ss after the graceful stop", what, proc.pid, timeout)
    for sig, wait_for in ((signal.SIGTERM, timeout), (signal.SIGKILL, kill_timeout)):
        if not proc.alive:
            return True
        log.info("%s pid %s: sending %s", what, proc.pid, sig.name)
        proc.signal_group(sig)
        if await proc.wait(wait_for) is not None:
            return True
        log.warning("%s pid %s still alive %ss after %s", what, proc.pid, wait_for, sig.name)
    return False


@dataclass(frozen=True)
class ToolResult:
    """How a short-lived tool ended and what it printed."""

    returncode: int
    stdout: bytes
    stderr: bytes  # empty with ``merge_stderr``


async def run_tool(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    merge_stderr: bool = False,
    env: Mapping[str, str] | None = None,
    umask: int = PRIVATE_UMASK,
) -> ToolResult:
    """Run a short-lived tool to its end (stdin from /dev/null), capturing its output.

    ``umask``: the tool's (default 077: what ``qemu-img create`` makes is private).
    OSError when it cannot be started; TimeoutError after ``timeout`` seconds. On timeout
    or cancellation the tool is killed and reaped before this returns (a second
    cancellation does not cut the reaping short; it is re-raised afterwards).
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
        umask=umask,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await shielded(proc.wait())
        raise
    assert proc.returncode is not None
    return ToolResult(proc.returncode, out, err or b"")
