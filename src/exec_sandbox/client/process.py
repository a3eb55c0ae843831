"""Background processes in the guest, host side: :meth:`ProcessControl.start_process` -> a handle.

A :class:`ProcessHandle` owns one ``proc_start`` request for the process's life. A pump task takes
its events off the connection as they come (so a process nobody listens to never holds up other
requests) into a byte-bounded ring of :class:`ProcessChunk`; any number of readers iterate
:meth:`ProcessHandle.output` over it, from the oldest chunk still held (``replay=True``) or from
now. While a reader lags a full ring behind, the pump waits for it: the connection's request budget
then fills and back-pressures the guest exactly as for an exec (a reader that takes nothing while
other requests wait is cut off after the connection's stall timeout). Memory per process is the ring
(``ring_bytes``, 1 MiB by default) plus the connection's per-request budget, whatever it prints.

The output cap given to the guest is enforced here as bytes arrive: more is a
:class:`GuestProtocolError` that breaks the connection (the layers above kill the VM).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from exec_sandbox.client.connection import AgentClientState, AgentConnection, Pending, build_model
from exec_sandbox.errors import (
    GuestAgentError,
    GuestProtocolError,
    SandboxError,
    SandboxInputError,
)
from exec_sandbox.protocol.agent import CancelRequest
from exec_sandbox.protocol.process import (
    ProcAck,
    ProcCloseStdinRequest,
    ProcExit,
    ProcInputRequest,
    ProcOutput,
    ProcResizeRequest,
    ProcSignalRequest,
    ProcStarted,
    ProcStartRequest,
    PtySize,
)

__all__ = [
    "DEFAULT_PROCESS_OUTPUT_CAP",
    "DEFAULT_RING_BYTES",
    "ProcessChunk",
    "ProcessControl",
    "ProcessExit",
    "ProcessHandle",
    "ProcessState",
]

logger = logging.getLogger(__name__)

DEFAULT_RING_BYTES = 1024 * 1024
DEFAULT_PROCESS_OUTPUT_CAP = 10 * 1024 * 1024
_INPUT_PIECE = 1024 * 1024  # raw bytes per proc_input frame (base64: 1.4 MiB, under the frame cap)
_NO_DEADLINE = 10.0**9
Stream = Literal["stdout", "stderr", "pty"]


class ProcessState(StrEnum):
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"  # the connection broke or the guest misbehaved: the outcome is unknown


@dataclass(frozen=True, slots=True)
class ProcessChunk:
    stream: Stream
    data: bytes
    seq: int


@dataclass(frozen=True, slots=True)
class ProcessExit:
    pid: int
    exit_code: int
    signal: int | None
    killed: bool
    timed_out: bool
    stdout_bytes: int
    stderr_bytes: int
    truncated: tuple[Stream, ...]


class ProcessHandle:
    """One background process (see the module docstring). Use ``async with`` or :meth:`aclose`."""

    def __init__(self, conn: ProcessControl, req_id: str, pending: Pending, pid: int, *,
                 max_output_bytes: int, ring_bytes: int) -> None:
        self._conn = conn
        self._req_id = req_id
        self._pending = pending
        self.pid = pid
        self._cap = max_output_bytes
        self._ring: deque[ProcessChunk] = deque()
        self._ring_bytes = 0
        self._ring_cap = ring_bytes
        self._next_seq = 0
        self._readers: dict[int, int] = {}  # reader id -> the next seq it wants
        self._reader_ids = 0
        self._changed = asyncio.Event()
        self._seen: dict[str, int] = {"stdout": 0, "stderr": 0, "pty": 0}
        self._exit: ProcessExit | None = None
        self._error: SandboxError | None = None
        self._done = asyncio.Event()
        self._pump = asyncio.get_running_loop().create_task(self._run(), name=f"proc-{req_id}")

    @property
    def state(self) -> ProcessState:
        if self._exit is not None:
            return ProcessState.EXITED
        return ProcessState.FAILED if self._error is not None else ProcessState.RUNNING

    @property
    def exit(self) -> ProcessExit | None:
        return self._exit

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the handle stops following the process (exit, failure, close)."""
        self._pump.add_done_callback(lambda _task: callback())

    def __repr__(self) -> str:
        return f"<ProcessHandle pid={self.pid} {self.state.value}>"

    async def __aenter__(self) -> ProcessHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ events

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _lagging(self) -> bool:
        """True when dropping the oldest chunk would take it from a reader that has not had it."""
        oldest = self._ring[0].seq
        return any(cursor <= oldest for cursor in self._readers.values())

    async def _run(self) -> None:
        conn = self._conn
        try:
            while True:
                msg = await conn._next(self._req_id, self._pending, _NO_DEADLINE)
                if isinstance(msg, ProcOutput):
                    await self._add(msg)
                elif isinstance(msg, ProcExit):
                    self._pending.completed = True
                    self._exit = ProcessExit(
                        pid=msg.pid, exit_code=msg.exit_code, signal=msg.signal, killed=msg.killed,
                        timed_out=msg.timed_out, stdout_bytes=msg.stdout_bytes,
                        stderr_bytes=msg.stderr_bytes, truncated=tuple(msg.truncated))
                    return
                else:
                    raise conn._violation(GuestProtocolError(
                        f"unexpected {msg.type!r} message for process {self.pid}",
                        reason="unexpected_message", request_id=self._req_id, context={"type": msg.type}))
        except SandboxError as exc:
            self._error = exc
        finally:
            conn._pending.pop(self._req_id, None)
            if not self._pending.completed:
                conn._forget(self._req_id)
            self._done.set()
            self._notify()

    async def _add(self, msg: ProcOutput) -> None:
        try:
            data = base64.b64decode(msg.data, validate=True)
        except (binascii.Error, ValueError):
            raise self._conn._violation(GuestProtocolError(
                "process output that is not base64", reason="bad_frame", request_id=self._req_id)) from None
        self._seen[msg.stream] += len(data)
        if self._seen[msg.stream] > self._cap:
            raise self._conn._violation(GuestProtocolError(
                f"the guest sent more than {self._cap} bytes of {msg.stream} for process {self.pid}",
                reason="output_cap", request_id=self._req_id, limit_bytes=self._cap,
                received_bytes=self._seen[msg.stream], context={"stream": msg.stream}))
        while self._ring and self._ring_bytes + len(data) > self._ring_cap and self._lagging():
            await self._changed.wait()
        self._ring.append(ProcessChunk(msg.stream, data, self._next_seq))
        self._next_seq += 1
        self._ring_bytes += len(data)
        while self._ring_bytes > self._ring_cap and len(self._ring) > 1:
            self._ring_bytes -= len(self._ring.popleft().data)
        self._notify()

    async def output(self, *, replay: bool = True) -> AsyncIterator[ProcessChunk]:
        """The process's output chunks, in order, until it exits (then the iteration ends).

        ``replay``: start with the oldest chunk still held in the ring (else: from now on). A lost
        connection raises its error once the chunks received before it are through.
        """
        reader = self._reader_ids = self._reader_ids + 1
        cursor = (self._ring[0].seq if self._ring else self._next_seq) if replay else self._next_seq
        self._readers[reader] = cursor
        try:
            while True:
                if self._ring and cursor <= self._ring[-1].seq:
                    chunk = self._ring[max(0, cursor - self._ring[0].seq)]
                    cursor = self._readers[reader] = chunk.seq + 1
                    self._notify()
                    yield chunk
                    continue
                if self._done.is_set():
                    if self._error is not None:
                        raise self._error
                    return
                await self._changed.wait()
        finally:
            self._readers.pop(reader, None)
            self._notify()

    async def wait(self, timeout: float | None = None) -> ProcessExit:
        """The exit; raises the connection's error if it broke first."""
        async with asyncio.timeout(timeout):
            await self._done.wait()
        if self._exit is None:
            assert self._error is not None
            raise self._error
        return self._exit

    # ------------------------------------------------------------------ control

    async def send_input(self, data: bytes, *, timeout: float = 30.0) -> None:
        """Write ``data`` to the process's stdin (or terminal). A full stdin is retried until
        ``timeout``; a process without stdin, or with a closed one, is a :class:`GuestAgentError`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for start in range(0, max(len(data), 1), _INPUT_PIECE):
            piece = base64.b64encode(data[start:start + _INPUT_PIECE]).decode()
            delay = 0.01
            while True:
                try:
                    await self._call(ProcInputRequest(id=self._conn._new_id(), pid=self.pid, data=piece),
                                     max(deadline - loop.time(), 0.0))
                    break
                except GuestAgentError as exc:
                    if exc.context.get("code") != "stdin_full" or loop.time() + delay > deadline:
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)

    async def close_stdin(self, *, timeout: float = 10.0) -> None:
        await self._call(ProcCloseStdinRequest(id=self._conn._new_id(), pid=self.pid), timeout)

    async def resize(self, rows: int, cols: int, *, timeout: float = 10.0) -> None:
        request = build_model(ProcResizeRequest, id=self._conn._new_id(), pid=self.pid, rows=rows, cols=cols)
        await self._call(request, timeout)

    async def signal(self, signal: int, *, timeout: float = 10.0) -> None:
        """Send ``signal`` to the process's group; 9 (SIGKILL) kills everything it started."""
        request = build_model(ProcSignalRequest, id=self._conn._new_id(), pid=self.pid, signal=signal)
        await self._call(request, timeout)

    async def kill(self, *, timeout: float = 10.0) -> ProcessExit | None:
        """SIGKILL the process's whole group and wait for its exit (None if the link broke)."""
        if self._done.is_set():
            return self._exit
        with contextlib.suppress(GuestAgentError):  # it may have exited meanwhile ("not_found")
            await self.signal(9, timeout=timeout)
        with contextlib.suppress(SandboxError, TimeoutError):
            return await self.wait(timeout)
        return None

    async def _call(self, request: ProcInputRequest | ProcCloseStdinRequest | ProcResizeRequest
                    | ProcSignalRequest, timeout: float) -> None:
        if self._done.is_set():
            raise GuestAgentError(f"process {self.pid} is not running ({self.state.value})",
                                  context={"code": "not_found", "pid": self.pid})
        async with self._conn._request(request) as (req_id, pending):
            await self._conn._expect(req_id, pending, ProcAck, timeout)

    async def aclose(self) -> None:
        """Kill the process if it still runs and stop following it. Idempotent."""
        if not self._done.is_set() and self._conn.state is AgentClientState.READY:
            with contextlib.suppress(SandboxError, OSError, ConnectionError):
                await asyncio.shield(self._conn._send_and_forget(
                    CancelRequest(id=self._conn._new_id(), target=self._req_id)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):
                    await self._done.wait()
        if not self._pump.done():
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump


class ProcessControl(AgentConnection):
    """The agent client's background-process requests (mixed into ``AgentClient``)."""

    async def start_process(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        root: bool = False,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        timeout_s: float | None = None,
        max_output_bytes: int = DEFAULT_PROCESS_OUTPUT_CAP,
        ring_bytes: int = DEFAULT_RING_BYTES,
        start_timeout: float = 30.0,
    ) -> ProcessHandle:
        """Start ``argv`` in the guest in a cgroup of its own and return its handle once it runs.

        ``root``: as the guest's root instead of the sandbox user. ``stdin``: a pipe fed by
        :meth:`ProcessHandle.send_input`. ``pty``: (rows, cols) of a terminal that is its stdin,
        stdout and stderr (output stream ``pty``). ``timeout_s``: the guest kills it then (None:
        never; it dies with the VM). ``max_output_bytes`` per stream: the guest drops the rest.
        """
        if ring_bytes < 1:
            raise SandboxInputError("ring_bytes must be positive", context={"field": "ring_bytes"})
        request = build_model(
            ProcStartRequest, id=self._new_id(), argv=list(argv), env=dict(env or {}), cwd=cwd, root=root,
            stdin=stdin, pty=None if pty is None else PtySize(rows=pty[0], cols=pty[1]),
            max_output_bytes=max_output_bytes, timeout_s=timeout_s)
        self._check_usable()
        pending = Pending(self._budget)
        self._pending[request.id] = pending
        handed_over = False
        try:
            await self._send(request, pending)
            started = await self._expect(request.id, pending, ProcStarted, start_timeout)
            pending.completed = False  # the process's events follow on the same request
            handle = ProcessHandle(self, request.id, pending, started.pid, max_output_bytes=max_output_bytes,
                                   ring_bytes=ring_bytes)
            handed_over = True
            return handle
        finally:
            if not handed_over:
                self._pending.pop(request.id, None)
                if pending.dispatched and not pending.completed:
                    self._forget(request.id)
                    with contextlib.suppress(SandboxError, OSError, ConnectionError):
                        await asyncio.shield(self._send_and_forget(
                            CancelRequest(id=self._new_id(), target=request.id)))
