"""Async host-side client of the guest agent, over any asyncio byte stream.

One reader task decodes frames (:mod:`exec_sandbox.protocol.agent`) and routes each message by its
request id to the waiting call, so many requests run concurrently on one connection; the events of
one request (output, then exit) arrive in the order the agent sent them.

Bounded memory, whatever the guest sends (the guest is hostile; so is the agent once guest code ran):

- the socket is read in 256 KiB pieces; the decoder holds at most one frame (4 MiB cap, checked on
  the header before any payload is awaited) plus one piece; asyncio's stream buffer pauses the
  transport at 512 KiB;
- every request has a byte-budgeted queue (``request_queue_bytes``, 4 MiB) and the connection a total
  (``queue_budget_bytes``, 8 MiB); each queued message is charged its payload + 1 KiB. When a queue
  is full the reader stops reading, so the virtio-serial port back-pressures the guest. A consumer
  that stays full for ``stall_timeout_s`` while other requests wait is abandoned (its request fails
  with :class:`CommunicationOutcomeUnknownError`) so it cannot hold up the others forever;
- output is counted on the host as it arrives: more than the exec's own caps (plus 64 Ki characters
  for the agent's notes) is a :class:`GuestProtocolError`; stdout/stderr accumulate in one growing
  buffer each (never a list of tiny strings);
- file reads count bytes as they arrive and stop at ``max_bytes`` with
  :class:`GuestFileTooLargeError` (path, cap, bytes received); nothing past the cap is kept.
  :meth:`AgentClient.iter_file` streams a file chunk by chunk, and ``read_file(path, Path)`` writes
  it to a private temp file (0600) renamed into place, so large files need no host memory;
- frames for requests this client never made or that already got their final answer, id-less
  errors and other strays are counted (16 allowed) and never logged one by one; late frames for
  requests the host gave up on (cancelled, timed out, cut at a cap; the last 4096) are dropped.

A :class:`GuestProtocolError` (bad frame, flood past a cap, unexpected message, stray frames) breaks
the connection: every call fails with it and the transport is closed; the layers above kill the VM.

Failure mapping (see :mod:`exec_sandbox.errors`):

- the agent broke the protocol or flooded past a host cap -> :class:`GuestProtocolError`
- the agent reported an error -> :class:`GuestAgentError`
- a file is larger than the host cap for this read -> :class:`GuestFileTooLargeError`
- the transport died, the agent restarted, or no answer came in time after the request was
  written -> :class:`CommunicationOutcomeUnknownError` (the request may have run)
- the client is not connected / never became ready -> :class:`SandboxTransientError`
- invalid arguments -> :class:`SandboxInputError`
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import inspect
import io
import itertools
import logging
import os
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar, overload

from pydantic import BaseModel, ValidationError

from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestAgentError,
    GuestFileTooLargeError,
    GuestProtocolError,
    SandboxError,
    SandboxInputError,
    SandboxTransientError,
)
from exec_sandbox.protocol.agent import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_OUTPUT_CAP_BYTES,
    MAX_FRAME_BYTES,
    CancelRequest,
    CancelResult,
    ErrorReply,
    ExecRequest,
    ExitEvent,
    FileChunk,
    FileEntry,
    FrameDecoder,
    FrameError,
    GuestMessage,
    Hello,
    HostRequest,
    Language,
    ListFilesRequest,
    ListResult,
    OutputEvent,
    PingRequest,
    ReadFileRequest,
    ReadResult,
    ReseedRequest,
    ReseedResult,
    ShutdownRequest,
    ShutdownResult,
    WarmupRequest,
    WarmupResult,
    WriteChunk,
    WriteFileRequest,
    WriteResult,
    encode_frame,
    parse_guest_message,
)
from smartvm.hostfs import UnsafePathError, atomic_writer

__all__ = [
    "DEFAULT_MAX_READ_BYTES",
    "DEFAULT_QUEUE_BUDGET_BYTES",
    "DEFAULT_REQUEST_QUEUE_BYTES",
    "DEFAULT_STALL_TIMEOUT_S",
    "AgentClient",
    "AgentClientState",
    "ExecResult",
    "OutputCallback",
]

logger = logging.getLogger(__name__)

#: Default cap of one file read (same as ``SchedulerConfig.max_file_bytes``'s default).
DEFAULT_MAX_READ_BYTES = 256 * 1024 * 1024
#: Bytes of guest messages one request may have waiting for its consumer.
DEFAULT_REQUEST_QUEUE_BYTES = 4 * 1024 * 1024
#: Bytes of guest messages all requests of one connection may have waiting together.
DEFAULT_QUEUE_BUDGET_BYTES = 8 * 1024 * 1024
#: How long a full queue may hold up the reader while other requests wait, before it is abandoned.
DEFAULT_STALL_TIMEOUT_S = 30.0
#: Host memory charged per queued message beyond its payload (parsed model, dict, str headers).
_MESSAGE_OVERHEAD = 1024
#: One socket read; also the asyncio stream limit (the transport pauses at twice this).
_READ_BYTES = 256 * 1024
#: Agent-authored notes (timeouts, resets, truncation) are not counted against the output caps.
_NOTE_SLACK_CHARS = 64 * 1024
#: Frames for requests never made / id-less errors tolerated on one connection after the hello.
_MAX_STRAY_FRAMES = 16
#: Requests given up on whose late frames are still dropped quietly (oldest forgotten first).
_MAX_ABANDONED = 4096

OutputCallback = Callable[[str], Awaitable[None] | None]
_M = TypeVar("_M", bound=BaseModel)
_R = TypeVar("_R")


class AgentClientState(StrEnum):
    NEW = "new"  # constructed, reader not started
    CONNECTED = "connected"  # reading; no hello seen yet
    READY = "ready"  # the agent said hello
    BROKEN = "broken"  # protocol violation or transport death; every call fails
    CLOSED = "closed"  # aclose() was called


@dataclass(frozen=True, slots=True)
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    cancelled: bool
    session_reset: bool
    duration_ms: float
    stdout_truncated: bool
    stderr_truncated: bool
    stdout_bytes: int
    stderr_bytes: int
    signal: int | None


class _Dead:
    """Queue sentinel: the request can get no further messages; raise ``error``."""

    def __init__(self, error: SandboxError) -> None:
        self.error = error


class _Budget:
    """Bytes queued on one connection, and a wake-up for a reader waiting for room."""

    __slots__ = ("freed", "per_request", "total", "total_limit")

    def __init__(self, per_request: int, total_limit: int) -> None:
        self.per_request = per_request
        self.total_limit = total_limit
        self.total = 0
        self.freed = asyncio.Event()


class _Pending:
    """The messages of one request waiting for its consumer, charged against the budget."""

    __slots__ = ("_budget", "_queue", "completed", "dispatched", "queued_bytes")

    def __init__(self, budget: _Budget) -> None:
        self._budget = budget
        self._queue: asyncio.Queue[tuple[GuestMessage | _Dead, int]] = asyncio.Queue()
        self.dispatched = False
        self.completed = False  # the final answer (result, exit, error) was taken
        self.queued_bytes = 0

    def put(self, item: GuestMessage | _Dead, cost: int = 0) -> None:
        self._queue.put_nowait((item, cost))
        self.queued_bytes += cost
        self._budget.total += cost

    def has_room(self, cost: int) -> bool:
        """Whether a message of ``cost`` may be queued now (an empty queue always takes one)."""
        if self.queued_bytes == 0:
            return True
        return (self.queued_bytes + cost <= self._budget.per_request
                and self._budget.total + cost <= self._budget.total_limit)

    async def get(self) -> GuestMessage | _Dead:
        item, cost = await self._queue.get()
        self._release(cost)
        return item

    def empty(self) -> bool:
        return self._queue.empty()

    def clear(self) -> None:
        while not self._queue.empty():
            _item, cost = self._queue.get_nowait()
            self._release(cost)

    def _release(self, cost: int) -> None:
        if cost:
            self.queued_bytes -= cost
            self._budget.total -= cost
            self._budget.freed.set()


class AgentClient:
    """Client of one guest agent connection.

    Use ``async with AgentClient(reader, writer) as agent: await agent.wait_ready()`` or
    :meth:`open_unix` for a unix socket (e.g. QEMU's virtio-serial chardev socket).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        name: str = "agent",
        request_queue_bytes: int = DEFAULT_REQUEST_QUEUE_BYTES,
        queue_budget_bytes: int = DEFAULT_QUEUE_BUDGET_BYTES,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max_frame = max_frame_bytes
        self.name = name
        self._decoder = FrameDecoder(max_frame_bytes=max_frame_bytes, resync=True)
        self._budget = _Budget(request_queue_bytes, max(queue_budget_bytes, request_queue_bytes))
        self._stall_timeout = stall_timeout_s
        self._pending: dict[str, _Pending] = {}
        self.stray_frames = 0  # frames after the hello for no request this client made
        self.discarded_frames = 0  # late frames for requests given up on (dropped, no memory kept)
        self._abandoned: dict[str, None] = {}  # ids given up on, oldest first
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self._send_lock = asyncio.Lock()
        self._hello_event = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._state = AgentClientState.NEW
        self._broken: SandboxError | None = None
        self.hello: Hello | None = None
        self.first_hello_at: float | None = None  # time.perf_counter() when the first hello arrived
        # time.monotonic() when the agent last sent anything: proof of life that costs no round trip.
        self.last_heard_at: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open_unix(
        cls, path: str | os.PathLike[str], *, connect_timeout: float = 10.0, **kwargs: Any
    ) -> AgentClient:
        """Connect to a unix socket (retrying while it does not exist yet) and start reading."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout
        delay = 0.005
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(os.fspath(path), limit=_READ_BYTES)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if loop.time() + delay > deadline:
                    raise SandboxTransientError(
                        f"cannot connect to the guest agent socket {os.fspath(path)}: {exc}",
                        context={"path": os.fspath(path)},
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
        client = cls(reader, writer, **kwargs)
        client.start()
        return client

    @property
    def state(self) -> AgentClientState:
        return self._state

    def start(self) -> None:
        """Start the reader task; a second call is a no-op."""
        if self._state is not AgentClientState.NEW:
            return
        self._state = AgentClientState.CONNECTED
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"{self.name}-reader"
        )

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; idempotent, safe in any state."""
        if self._state is AgentClientState.CLOSED:
            return
        self._state = AgentClientState.CLOSED
        self._fail_all(SandboxTransientError("the agent client was closed"), closed=True)
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()

    # ------------------------------------------------------------------ readiness

    async def wait_ready(self, timeout: float = 30.0, *, ping_interval: float = 0.1) -> Hello:
        """Ping until the agent answers (virtio-serial drops writes while the guest is not listening)."""
        self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = ping_interval
        while True:
            self._check_usable()
            if self._hello_event.is_set() and self.hello is not None:
                return self.hello
            req_id = self._new_id()
            self._pending[req_id] = _Pending(self._budget)
            try:
                await self._send(PingRequest(id=req_id))
                remaining = deadline - loop.time()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(interval, max(remaining, 0))):
                        await self._hello_event.wait()
            finally:
                self._pending.pop(req_id, None)
            if self._hello_event.is_set() and self.hello is not None:
                return self.hello
            if loop.time() >= deadline:
                self._check_usable()
                raise SandboxTransientError(
                    f"the guest agent did not answer within {timeout:g}s",
                    context={"timeout_s": timeout, "skipped_bytes": self._decoder.skipped_bytes},
                )
            interval = min(interval * 1.5, 1.0)

    async def ping(self, timeout: float = 10.0) -> Hello:
        """One round trip; returns the agent's hello."""
        async with self._request(PingRequest(id=self._new_id())) as (req_id, pending):
            return await self._expect(req_id, pending, Hello, timeout)

    # ------------------------------------------------------------------ exec

    async def exec(
        self,
        code: str,
        *,
        language: Language,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        cwd: str | None = None,
        session: bool = False,
        max_stdout_bytes: int = DEFAULT_OUTPUT_CAP_BYTES,
        max_stderr_bytes: int = DEFAULT_OUTPUT_CAP_BYTES,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        reply_grace_s: float = 30.0,
        refill_spare: bool = True,
        prime_spare: bool = False,
    ) -> ExecResult:
        """Run ``code``; output is passed to the callbacks as produced and collected in the result.

        The agent enforces ``timeout_s`` (exit_code -1, ``timed_out``); ``reply_grace_s`` more is
        allowed for the answer before the outcome is declared unknown. A failing callback is logged
        and does not stop the run. ``refill_spare=False``: this is the VM's last one-shot exec, the
        agent need not start another spare interpreter afterwards. ``prime_spare=True`` (warm-up
        code of the host's own only, never user code): run in the spare one-shot interpreter and
        keep it instead of replacing it.

        The caps are enforced here too (see :meth:`exec_events`); each stream is collected in one
        growing buffer, and a callback is awaited before the next message is taken (a slow callback
        back-pressures the guest instead of growing a queue).
        """
        stdout = io.StringIO()
        stderr = io.StringIO()
        failures = [0]
        exit_event: ExitEvent | None = None
        events = self.exec_events(
            code, language=language, env=env, timeout_s=timeout_s, cwd=cwd, session=session,
            max_stdout_bytes=max_stdout_bytes, max_stderr_bytes=max_stderr_bytes,
            reply_grace_s=reply_grace_s, refill_spare=refill_spare, prime_spare=prime_spare,
        )
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, OutputEvent):
                    is_out = event.stream == "stdout"
                    (stdout if is_out else stderr).write(event.data)
                    callback = on_stdout if is_out else on_stderr
                    if callback is not None:
                        await _call_safely(callback, event.data, failures)
                else:
                    exit_event = event
        if exit_event is None:  # pragma: no cover - exec_events raises instead of ending early
            raise GuestAgentError("exec ended without an exit event")
        event = exit_event
        if failures[0] > 1:
            logger.warning("%s: output callback failed %d times in one exec", self.name, failures[0])
        return ExecResult(
            stdout=stdout.getvalue(), stderr=stderr.getvalue(), exit_code=event.exit_code,
            timed_out=event.timed_out, cancelled=event.cancelled,
            session_reset=event.session_reset, duration_ms=event.duration_ms,
            stdout_truncated=event.stdout_truncated, stderr_truncated=event.stderr_truncated,
            stdout_bytes=event.stdout_bytes, stderr_bytes=event.stderr_bytes, signal=event.signal,
        )

    async def exec_events(
        self,
        code: str,
        *,
        language: Language,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        cwd: str | None = None,
        session: bool = False,
        max_stdout_bytes: int = DEFAULT_OUTPUT_CAP_BYTES,
        max_stderr_bytes: int = DEFAULT_OUTPUT_CAP_BYTES,
        reply_grace_s: float = 30.0,
        refill_spare: bool = True,
        prime_spare: bool = False,
    ) -> AsyncGenerator[OutputEvent | ExitEvent, None]:
        """Yield output events in order, then the exit event (last).

        Output is counted as it arrives: a stream that exceeds its cap (plus 64 Ki characters of
        agent notes) means the agent ignored the cap, a :class:`GuestProtocolError` that breaks the
        connection. (The agent decodes UTF-8 with replacement, so characters never exceed bytes.)
        """
        request = _build(
            ExecRequest, id=self._new_id(), language=language, code=code, env=dict(env or {}),
            timeout_s=timeout_s, cwd=cwd, session=session, max_stdout_bytes=max_stdout_bytes,
            max_stderr_bytes=max_stderr_bytes, refill_spare=None if refill_spare else False,
            prime_spare=True if prime_spare else None,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s + reply_grace_s
        caps = {"stdout": max_stdout_bytes + _NOTE_SLACK_CHARS,
                "stderr": max_stderr_bytes + _NOTE_SLACK_CHARS}
        seen = {"stdout": 0, "stderr": 0}
        async with self._request(request) as (req_id, pending):
            finished = False
            try:
                while True:
                    msg = await self._next(req_id, pending, deadline - loop.time())
                    if isinstance(msg, OutputEvent):
                        seen[msg.stream] += len(msg.data)
                        if seen[msg.stream] > caps[msg.stream]:
                            raise self._violation(GuestProtocolError(
                                f"the guest sent more than {caps[msg.stream]} characters of {msg.stream} "
                                f"(the cap it was given is {caps[msg.stream] - _NOTE_SLACK_CHARS} bytes)",
                                reason="output_cap", request_id=req_id, limit_bytes=caps[msg.stream],
                                received_bytes=seen[msg.stream], context={"stream": msg.stream}))
                        yield msg
                    elif isinstance(msg, ExitEvent):
                        finished = pending.completed = True
                        yield msg
                        return
                    else:
                        raise self._violation(_unexpected(req_id, msg, "output/exit"))
            finally:
                if not finished and self._state is AgentClientState.READY:
                    # Cancelled or timed out here: ask the agent to kill the run (best effort).
                    with contextlib.suppress(SandboxError, OSError, ConnectionError):
                        await asyncio.shield(self._send_and_forget(CancelRequest(id=self._new_id(),
                                                                                 target=req_id)))

    async def cancel(self, target_id: str, timeout: float = 10.0) -> bool:
        """Kill the running exec ``target_id``; True when the agent found it."""
        async with self._request(CancelRequest(id=self._new_id(), target=target_id)) as (req_id, pending):
            return (await self._expect(req_id, pending, CancelResult, timeout)).found

    async def warmup(
        self,
        languages: Sequence[Language],
        *,
        session: bool = True,
        spare: bool = False,
        timeout: float = 120.0,
    ) -> WarmupResult:
        """Start interpreters ahead of use.

        ``session``: the persistent REPL used by ``exec(session=True)``. ``spare``: a started, unused
        interpreter that the next one-shot exec runs in (then discards; a new spare is started in
        the background) - one-shot semantics without paying the interpreter start-up per run.
        """
        request = _build(WarmupRequest, id=self._new_id(), languages=list(languages), session=session,
                         spare=spare)
        async with self._request(request) as (req_id, pending):
            return await self._expect(req_id, pending, WarmupResult, timeout)

    # ------------------------------------------------------------------ files

    async def write_file(
        self,
        path: str,
        data: bytes | Path | IO[bytes],
        *,
        make_executable: bool = False,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        timeout: float = 300.0,
    ) -> WriteResult:
        """Upload ``data`` to ``path`` (relative to the guest work dir) in sha256-checked chunks.

        The guest writes a temporary file and renames it into place only when the whole-file
        sha256 matches, so a failed upload leaves nothing behind.
        """
        if not 1 <= chunk_size <= 1024 * 1024 * 2:
            raise SandboxInputError("chunk_size must be between 1 byte and 2 MiB")
        with _open_source(data) as (fh, size):
            digest = await asyncio.to_thread(_sha256_of, fh)
            request = _build(WriteFileRequest, id=self._new_id(), path=path, size=size, sha256=digest,
                             make_executable=make_executable)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            async with self._request(request) as (req_id, pending):
                fh.seek(0)
                seq = 0
                sent = 0
                while sent < size:
                    if not pending.empty():
                        break  # the agent already answered (an error): stop streaming
                    chunk = fh.read(min(chunk_size, size - sent))
                    if not chunk:
                        raise SandboxInputError(f"source for {path!r} shrank while uploading")
                    await self._send(WriteChunk(
                        id=req_id, seq=seq, data=base64.b64encode(chunk).decode(),
                        sha256=hashlib.sha256(chunk).hexdigest()))
                    seq += 1
                    sent += len(chunk)
                result = await self._expect(req_id, pending, WriteResult, deadline - loop.time())
        if result.sha256 != digest or result.size != size:
            raise GuestAgentError(
                f"the guest stored {result.size} bytes with sha256 {result.sha256}, sent {size} / {digest}",
                context={"path": path},
            )
        return result

    @overload
    async def read_file(self, path: str, destination: None = None, *, chunk_size: int = ...,
                        timeout: float = ..., max_bytes: int | None = ...) -> bytes: ...

    @overload
    async def read_file(self, path: str, destination: Path | IO[bytes], *, chunk_size: int = ...,
                        timeout: float = ..., max_bytes: int | None = ...) -> ReadResult: ...

    async def read_file(
        self,
        path: str,
        destination: Path | IO[bytes] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        timeout: float = 300.0,
        max_bytes: int | None = DEFAULT_MAX_READ_BYTES,
    ) -> bytes | ReadResult:
        """Download ``path``: into memory (returns bytes) or into ``destination`` (returns ReadResult).

        Every chunk and the whole file are sha256-checked. Bytes are counted as they arrive: past
        ``max_bytes`` (None: no cap - only sensible with a destination) the transfer ends with
        :class:`GuestFileTooLargeError` and nothing beyond the cap is kept. In memory the file costs
        its size once (one growing buffer, no join). A ``Path`` destination is written to a private
        temporary sibling (``mkstemp``, 0600) and atomically renamed into place when complete; a
        symlink at ``destination`` is refused. For a large file prefer a ``Path`` or :meth:`iter_file`.
        """
        if destination is None:
            buffer = io.BytesIO()
            await self._read_into(path, buffer.write, chunk_size, timeout, max_bytes)
            return buffer.getvalue()
        if isinstance(destination, Path):
            return await _write_file_atomically(
                destination, lambda write: self._read_into(path, write, chunk_size, timeout, max_bytes))
        sink = destination
        return await self._read_into(path, lambda chunk: asyncio.to_thread(sink.write, chunk), chunk_size,
                                     timeout, max_bytes)

    async def iter_file(
        self,
        path: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        timeout: float = 300.0,
        max_bytes: int | None = DEFAULT_MAX_READ_BYTES,
    ) -> AsyncGenerator[bytes, None]:
        """Stream ``path`` chunk by chunk (each <= ``chunk_size``), with bounded host memory.

        Each chunk is sha256-checked before it is yielded; the whole file's size and sha256 are
        checked when the guest ends the transfer (a mismatch raises after the last chunk, so treat
        the data as unconfirmed until the iteration ends normally). ``max_bytes`` as in
        :meth:`read_file`. Close the iterator (``contextlib.aclosing``) if you stop early.
        """
        async with contextlib.aclosing(self._read_chunks(path, chunk_size, timeout, max_bytes)) as chunks:
            async for item in chunks:
                if isinstance(item, bytes):
                    yield item

    async def _read_into(
        self,
        path: str,
        write: Callable[[bytes], object],
        chunk_size: int,
        timeout: float,
        max_bytes: int | None,
    ) -> ReadResult:
        """Read ``path`` into ``write`` (sync, or returning an awaitable that is awaited)."""
        result: ReadResult | None = None
        async with contextlib.aclosing(self._read_chunks(path, chunk_size, timeout, max_bytes)) as chunks:
            async for item in chunks:
                if isinstance(item, ReadResult):
                    result = item
                else:
                    written = write(item)
                    if inspect.isawaitable(written):
                        await written
        assert result is not None  # _read_chunks ends with the result or raises
        return result

    async def _read_chunks(
        self, path: str, chunk_size: int, timeout: float, max_bytes: int | None
    ) -> AsyncGenerator[bytes | ReadResult, None]:
        """The chunks of ``path`` as they arrive (counted, checked), then the guest's ReadResult."""
        if max_bytes is not None and max_bytes < 0:
            raise SandboxInputError("max_bytes must be >= 0", context={"max_bytes": max_bytes})
        request = _build(ReadFileRequest, id=self._new_id(), path=path, chunk_size=chunk_size)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        whole = hashlib.sha256()
        async with self._request(request) as (req_id, pending):
            finished = False
            try:
                seq = offset = 0
                while True:
                    msg = await self._next(req_id, pending, deadline - loop.time())
                    if isinstance(msg, FileChunk):
                        chunk = self._chunk_bytes(msg, req_id, path, seq, offset, chunk_size)
                        if max_bytes is not None and offset + len(chunk) > max_bytes:
                            raise GuestFileTooLargeError(
                                f"{path!r} is larger than the {max_bytes}-byte cap of this read: "
                                f"{offset + len(chunk)} bytes had arrived when the host stopped it",
                                path=path, limit_bytes=max_bytes, received_bytes=offset + len(chunk),
                                context={"request_id": req_id})
                        whole.update(chunk)
                        seq += 1
                        offset += len(chunk)
                        yield chunk
                    elif isinstance(msg, ReadResult):
                        if msg.size != offset or msg.chunks != seq or msg.sha256 != whole.hexdigest():
                            raise self._violation(GuestProtocolError(
                                f"downloaded {offset} bytes / {seq} chunks with sha256 {whole.hexdigest()}, "
                                f"the guest announced {msg.size} / {msg.chunks} / {msg.sha256}",
                                reason="bad_read_result", request_id=req_id, received_bytes=offset,
                                context={"path": path}))
                        finished = pending.completed = True
                        yield msg
                        return
                    else:
                        raise self._violation(_unexpected(req_id, msg, "file_chunk/read_result"))
            finally:
                if not finished and self._state is AgentClientState.READY:
                    # Ended early (cap, error, cancellation): ask the agent to stop (best effort;
                    # whatever it still sends for this request is dropped on arrival).
                    with contextlib.suppress(SandboxError, OSError, ConnectionError):
                        await asyncio.shield(self._send_and_forget(CancelRequest(id=self._new_id(),
                                                                                 target=req_id)))

    def _chunk_bytes(self, msg: FileChunk, req_id: str, path: str, seq: int, offset: int,
                     chunk_size: int) -> bytes:
        """The checked bytes of one file chunk; anything wrong is the guest's protocol violation."""
        if msg.seq != seq or msg.offset != offset:
            raise self._violation(GuestProtocolError(
                f"file chunk out of order (got {msg.seq} at {msg.offset}, want {seq} at {offset})",
                reason="bad_chunk", request_id=req_id, context={"path": path}))
        try:
            chunk = base64.b64decode(msg.data, validate=True)
        except ValueError:
            raise self._violation(GuestProtocolError(
                "file chunk is not valid base64", reason="bad_chunk", request_id=req_id,
                context={"path": path})) from None
        if len(chunk) > chunk_size:
            raise self._violation(GuestProtocolError(
                f"file chunk of {len(chunk)} bytes, more than the {chunk_size} asked for",
                reason="bad_chunk", request_id=req_id, limit_bytes=chunk_size,
                received_bytes=len(chunk), context={"path": path}))
        if hashlib.sha256(chunk).hexdigest() != msg.sha256:
            raise self._violation(GuestProtocolError(
                f"file chunk {seq} failed its sha256 check", reason="bad_chunk", request_id=req_id,
                context={"path": path}))
        return chunk

    async def list_files(self, path: str = ".", timeout: float = 30.0) -> list[FileEntry]:
        request = _build(ListFilesRequest, id=self._new_id(), path=path)
        async with self._request(request) as (req_id, pending):
            return (await self._expect(req_id, pending, ListResult, timeout)).entries

    # ------------------------------------------------------------------ misc

    async def reseed_rng(self, seed: bytes | None = None, timeout: float = 10.0) -> ReseedResult:
        """Mix fresh host randomness into the guest's RNG (call after every snapshot restore)."""
        seed = secrets.token_bytes(64) if seed is None else seed
        if not 16 <= len(seed) <= 4096:
            raise SandboxInputError("seed must be 16..4096 bytes")
        request = ReseedRequest(id=self._new_id(), seed=base64.b64encode(seed).decode())
        async with self._request(request) as (req_id, pending):
            return await self._expect(req_id, pending, ReseedResult, timeout)

    async def ready_and_reseeded(
        self, seed: bytes | None = None, timeout: float = 30.0, *, ping_interval: float = 0.25
    ) -> tuple[Hello, ReseedResult]:
        """:meth:`wait_ready` and :meth:`reseed_rng` in one round trip (after a snapshot restore).

        A ping and the reseed go out in one write; the agent answers them in order, so the reseed
        result normally arrives right behind the hello. If the first ping is not answered (the guest
        was not listening yet and its port dropped the bytes), this falls back to ``wait_ready`` and
        a separate reseed - reseeding twice is harmless, never reseeding is not. A restored guest
        under TCG takes ~100-150 ms to answer its first request (every code path is translated
        afresh), hence the longer first ``ping_interval``.
        """
        seed = secrets.token_bytes(64) if seed is None else seed
        if not 16 <= len(seed) <= 4096:
            raise SandboxInputError("seed must be 16..4096 bytes")
        self.start()
        self._check_usable()
        if self._state is AgentClientState.READY:
            assert self.hello is not None
            return self.hello, await self.reseed_rng(seed, timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ping = PingRequest(id=self._new_id())
        reseed = ReseedRequest(id=self._new_id(), seed=base64.b64encode(seed).decode())
        ping_pending, reseed_pending = _Pending(self._budget), _Pending(self._budget)
        self._pending[ping.id] = ping_pending
        self._pending[reseed.id] = reseed_pending
        try:
            await self._send_all((ping, ping_pending), (reseed, reseed_pending))
            with contextlib.suppress(CommunicationOutcomeUnknownError):
                result = await self._expect(reseed.id, reseed_pending, ReseedResult, ping_interval)
                # (A reseed that overtook a dropped ping: the hello is still to come.)
                hello = self.hello or await self.wait_ready(max(deadline - loop.time(), 0.0))
                return hello, result
            hello = await self.wait_ready(max(deadline - loop.time(), 0.0), ping_interval=ping_interval)
            if not ping_pending.empty() or not reseed_pending.empty():
                # The first ping arrived, so did the reseed behind it: its answer is on the way.
                result = await self._expect(reseed.id, reseed_pending, ReseedResult,
                                            max(deadline - loop.time(), 0.0))
                return hello, result
        finally:
            for req_id, pending in ((ping.id, ping_pending), (reseed.id, reseed_pending)):
                self._pending.pop(req_id, None)
                if not pending.completed:
                    self._forget(req_id)
        return hello, await self.reseed_rng(seed, max(deadline - loop.time(), 0.0))

    async def shutdown(self, timeout: float = 10.0) -> ShutdownResult:
        """Ask the agent to stop (in a VM: power off). The transport closes soon after."""
        async with self._request(ShutdownRequest(id=self._new_id())) as (req_id, pending):
            return await self._expect(req_id, pending, ShutdownResult, timeout)

    # ------------------------------------------------------------------ internals

    def _new_id(self) -> str:
        # A per-client prefix keeps late replies meant for an earlier connection from matching.
        return f"{self._prefix}-{next(self._ids)}"

    async def _send_and_forget(self, request: HostRequest) -> None:
        """Send a request whose answer nobody waits for (its reply is dropped on arrival)."""
        self._forget(request.id)
        await self._send(request)

    def _forget(self, req_id: str) -> None:
        """Late frames for ``req_id`` are dropped quietly from now on (bounded memory)."""
        self._abandoned[req_id] = None
        if len(self._abandoned) > _MAX_ABANDONED:
            del self._abandoned[next(iter(self._abandoned))]

    def _check_usable(self) -> None:
        if self._state is AgentClientState.CLOSED:
            raise SandboxTransientError("the agent client is closed", context={"state": self._state.value})
        if self._state is AgentClientState.BROKEN:
            assert self._broken is not None
            if isinstance(self._broken, GuestProtocolError):
                raise GuestProtocolError(f"the agent connection is broken: {self._broken.message}",
                                         reason=self._broken.reason, context={"state": self._state.value})
            if isinstance(self._broken, GuestAgentError):
                raise GuestAgentError(f"the agent connection is broken: {self._broken.message}",
                                      context={"state": self._state.value})
            raise SandboxTransientError(f"the agent connection is gone: {self._broken.message}",
                                        context={"state": self._state.value})
        if self._state is AgentClientState.NEW:
            raise SandboxTransientError("the agent client was not started", context={"state": "new"})

    @contextlib.asynccontextmanager
    async def _request(self, request: HostRequest) -> AsyncIterator[tuple[str, _Pending]]:
        self._check_usable()
        if self._state is not AgentClientState.READY:
            raise SandboxTransientError("the guest agent is not ready (call wait_ready first)",
                                        context={"state": self._state.value})
        req_id = request.id
        pending = _Pending(self._budget)
        self._pending[req_id] = pending
        try:
            await self._send(request, pending)
            yield req_id, pending
        finally:
            self._pending.pop(req_id, None)
            if not pending.completed:
                self._forget(req_id)

    async def _send_all(self, *requests: tuple[HostRequest, _Pending]) -> None:
        """Several requests in one write (one wake-up of the guest)."""
        frames = []
        for request, _pending in requests:
            try:
                frames.append(encode_frame(request.model_dump(mode="json", exclude_none=True),
                                           max_frame_bytes=self._max_frame))
            except FrameError as exc:
                raise SandboxInputError(f"{request.type} request is too large: {exc.message}",
                                        context=exc.context) from None
        async with self._send_lock:
            self._check_usable()
            for _request, pending in requests:
                pending.dispatched = True
            try:
                self._writer.write(b"".join(frames))
                await self._writer.drain()
            except (OSError, ConnectionError, RuntimeError) as exc:
                error = CommunicationOutcomeUnknownError(
                    f"writing to the guest agent failed: {exc}", context={"request_id": requests[0][0].id})
                self._break(error)
                raise error from exc

    async def _send(self, request: HostRequest, pending: _Pending | None = None) -> None:
        try:
            frame = encode_frame(request.model_dump(mode="json", exclude_none=True),
                                 max_frame_bytes=self._max_frame)
        except FrameError as exc:  # the caller's input is too big to send: nothing was dispatched
            raise SandboxInputError(f"{request.type} request is too large: {exc.message}",
                                    context=exc.context) from None
        async with self._send_lock:
            self._check_usable()
            if pending is not None:
                pending.dispatched = True
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except (OSError, ConnectionError, RuntimeError) as exc:
                error = CommunicationOutcomeUnknownError(
                    f"writing to the guest agent failed: {exc}", context={"request_id": request.id})
                self._break(error)
                raise error from exc

    async def _next(self, req_id: str, pending: _Pending, timeout: float) -> GuestMessage:
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that races a
        # reply already queued, so a cancelled exec would run on to its own timeout.
        try:
            async with asyncio.timeout(max(timeout, 0)):
                msg = await pending.get()
        except TimeoutError:
            raise CommunicationOutcomeUnknownError(
                "no answer from the guest agent in time", context={"request_id": req_id}
            ) from None
        if isinstance(msg, _Dead):
            raise msg.error
        if isinstance(msg, ErrorReply):
            pending.completed = True
            raise GuestAgentError(f"guest agent refused the request: {msg.code}: {msg.message}",
                                  context={"request_id": req_id, "code": msg.code})
        return msg

    async def _expect(self, req_id: str, pending: _Pending, kind: type[_M], timeout: float) -> _M:
        msg = await self._next(req_id, pending, timeout)
        if not isinstance(msg, kind):
            raise self._violation(_unexpected(req_id, msg, kind.__name__))
        pending.completed = True
        return msg

    async def _read_loop(self) -> None:
        try:
            while self._state in (AgentClientState.CONNECTED, AgentClientState.READY):
                data = await self._reader.read(_READ_BYTES)
                if not data:
                    self._break(CommunicationOutcomeUnknownError("the guest agent closed the connection"))
                    return
                self.last_heard_at = time.monotonic()
                for payload in self._decoder.feed(data):
                    await self._route(payload)
        except asyncio.CancelledError:
            raise
        except GuestProtocolError as exc:
            self._break(exc)
        except (OSError, ConnectionError) as exc:
            self._break(CommunicationOutcomeUnknownError(f"reading from the guest agent failed: {exc}"))

    async def _route(self, payload: bytes) -> None:
        try:
            msg = parse_guest_message(payload)
        except FrameError:
            if self.hello is None:
                return  # stale bytes from an earlier connection: skip until the first hello
            raise
        if isinstance(msg, Hello):
            self._on_hello(msg)
            return
        pending = None if msg.id is None else self._pending.get(msg.id)
        if pending is not None and msg.id is not None:
            await self._deliver(msg.id, pending, msg, len(payload) + _MESSAGE_OVERHEAD)
        elif msg.id is not None and msg.id in self._abandoned:
            self.discarded_frames += 1  # a late frame for a request we gave up on: drop it
        else:
            self._stray(msg)

    def _stray(self, msg: GuestMessage) -> None:
        """A frame for no request of ours (or an id-less error): tolerated a few times, then fatal."""
        if self.hello is None:
            return  # before the first hello: leftovers of an earlier connection
        self.stray_frames += 1
        if self.stray_frames == 1:
            text = msg.message if isinstance(msg, ErrorReply) else ""
            logger.warning("%s: agent sent %s for no request of ours (id %.40r) %.200s",
                           self.name, msg.type, msg.id, text)
        if self.stray_frames > _MAX_STRAY_FRAMES:
            raise GuestProtocolError(
                f"the guest agent sent {self.stray_frames} frames for no open request (never made, "
                "or already answered)",
                reason="unknown_request", context={"last_type": msg.type, "last_id": str(msg.id)[:40]})

    async def _deliver(self, req_id: str, pending: _Pending, msg: GuestMessage, cost: int) -> None:
        """Queue ``msg`` for its consumer; while its queue is full, stop reading (back-pressure)."""
        loop = asyncio.get_running_loop()
        stalled_since: float | None = None
        while not pending.has_room(cost):
            if self._pending.get(req_id) is not pending or self._state in (AgentClientState.BROKEN,
                                                                          AgentClientState.CLOSED):
                return  # the request ended (or the connection broke) while we waited
            if len(self._pending) > 1:  # others wait behind this consumer: give it a deadline
                now = loop.time()
                stalled_since = now if stalled_since is None else stalled_since
                if now - stalled_since >= self._stall_timeout:
                    self._abandon(req_id, pending, cost)
                    return
            else:
                stalled_since = None
            self._budget.freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await self._budget.freed.wait()
        if self._pending.get(req_id) is pending:
            pending.put(msg, cost)

    def _abandon(self, req_id: str, pending: _Pending, cost: int) -> None:
        """Fail a request whose consumer stopped taking messages; later frames for it are dropped."""
        logger.warning("%s: request %s abandoned: its consumer took nothing for %.0fs while %d other "
                       "requests waited", self.name, req_id, self._stall_timeout, len(self._pending) - 1)
        pending.clear()
        self._pending.pop(req_id, None)
        pending.put(_Dead(CommunicationOutcomeUnknownError(
            f"request {req_id} was abandoned: its consumer took no message for {self._stall_timeout:g}s "
            "while other requests waited on the same connection",
            context={"request_id": req_id, "queued_bytes": pending.queued_bytes + cost})))

    def _violation(self, error: GuestProtocolError) -> GuestProtocolError:
        """Break the connection for a protocol violation found by a consumer; returns the error."""
        self._break(error)
        return error

    def _on_hello(self, hello: Hello) -> None:
        previous = self.hello
        if self.first_hello_at is None:
            self.first_hello_at = time.perf_counter()
        if previous is not None and previous.instance != hello.instance:
            # A new agent process cannot answer what the old one was asked.
            self._fail_all(CommunicationOutcomeUnknownError(
                "the guest agent restarted while requests were outstanding",
                context={"old_instance": previous.instance, "new_instance": hello.instance}))
        self.hello = hello
        self._max_frame = min(self._max_frame, hello.max_frame_bytes)
        self._decoder.resync = False  # from now on every violation is fatal
        if self._state is AgentClientState.CONNECTED:
            self._state = AgentClientState.READY
        self._hello_event.set()
        if hello.id is not None and hello.id in self._pending:
            pending = self._pending[hello.id]
            if pending.has_room(_MESSAGE_OVERHEAD):  # a ping needs one hello; a flood of them is dropped
                pending.put(hello, _MESSAGE_OVERHEAD)

    def _break(self, error: SandboxError) -> None:
        if self._state in (AgentClientState.BROKEN, AgentClientState.CLOSED):
            return
        self._state = AgentClientState.BROKEN
        self._broken = error
        self._fail_all(error)
        if isinstance(error, GuestProtocolError):
            # A misbehaving guest gets no more of our attention: stop reading and writing. (The
            # reader sees EOF or its state and ends; the owner of the VM kills it.)
            logger.warning("%s: guest protocol violation (%s): %s", self.name, error.reason, error.message)
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.close()

    def _fail_all(self, error: SandboxError, *, closed: bool = False) -> None:
        for req_id, pending in list(self._pending.items()):
            if isinstance(error, GuestProtocolError):
                err: SandboxError = GuestProtocolError(
                    error.message, reason=error.reason, limit_bytes=error.limit_bytes,
                    received_bytes=error.received_bytes, context={**error.context, "request_id": req_id})
                pending.clear()  # nothing more from a misbehaving guest reaches a caller
            elif isinstance(error, GuestAgentError):
                err = GuestAgentError(error.message, context={**error.context, "request_id": req_id})
            elif pending.dispatched:
                err = CommunicationOutcomeUnknownError(
                    error.message if not closed else "the agent client was closed during the request",
                    context={**error.context, "request_id": req_id})
            else:
                err = SandboxTransientError(error.message, context={**error.context, "request_id": req_id})
            pending.put(_Dead(err))


# ---------------------------------------------------------------------- helpers


def _build(model: type[_M], **fields: Any) -> _M:
    try:
        return model(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise SandboxInputError(f"invalid {where}: {first.get('msg')}",
                                context={"field": where}) from None


def _unexpected(req_id: str, msg: GuestMessage, wanted: str) -> GuestProtocolError:
    return GuestProtocolError(f"unexpected {msg.type!r} message for request {req_id} (wanted {wanted})",
                              reason="unexpected_message", request_id=req_id, context={"type": msg.type})


async def _call_safely(callback: OutputCallback, data: str, failures: list[int]) -> None:
    """Run an output callback; its failures are logged once per exec (the guest sets the pace)."""
    try:
        result = callback(data)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except Exception:
        failures[0] += 1
        if failures[0] == 1:
            logger.exception("output callback failed; continuing (further failures are counted)")


async def _write_file_atomically(
    destination: Path, produce: Callable[[Callable[[bytes], object]], Awaitable[_R]]
) -> _R:
    """Write what ``produce`` emits to ``destination`` through :func:`smartvm.hostfs.atomic_writer`.

    A private temp file beside ``destination``, renamed over it only when ``produce`` succeeded and
    removed otherwise; a symlink (or a directory) at ``destination`` is refused. Unsafe or unwritable
    host paths are the caller's input (:class:`SandboxInputError` naming the path).
    """
    try:
        writer = await asyncio.to_thread(atomic_writer, destination)
    except (UnsafePathError, OSError) as exc:
        raise SandboxInputError(f"cannot write {destination}: {exc}",
                                context={"path": str(destination)}) from exc
    with writer:
        result = await produce(lambda chunk: asyncio.to_thread(writer.file.write, chunk))
        try:
            await asyncio.to_thread(writer.commit)
        except (UnsafePathError, OSError) as exc:
            raise SandboxInputError(f"cannot write {destination}: {exc}",
                                    context={"path": str(destination)}) from exc
    return result


def _sha256_of(fh: IO[bytes]) -> str:
    h = hashlib.sha256()
    fh.seek(0)
    for block in iter(lambda: fh.read(1024 * 1024), b""):
        h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _open_source(data: bytes | Path | IO[bytes]) -> Any:
    import io

    if isinstance(data, bytes | bytearray | memoryview):
        buf = io.BytesIO(bytes(data))
        yield buf, len(buf.getbuffer())
    elif isinstance(data, Path):
        try:
            fh = data.open("rb")
        except OSError as exc:
            raise SandboxInputError(f"cannot read {data}: {exc}", context={"path": str(data)}) from exc
        with fh:
            yield fh, os.fstat(fh.fileno()).st_size
    else:
        if not data.seekable():
            # One pass to a spool keeps memory bounded while still knowing size and hash up front.
            import tempfile

            with tempfile.TemporaryFile() as spool:
                for block in iter(lambda: data.read(1024 * 1024), b""):
                    spool.write(block)
                size = spool.tell()
                yield spool, size
        else:
            start = data.tell()
            data.seek(0, os.SEEK_END)
            size = data.tell() - start
            data.seek(start)
            yield _Offset(data, start), size


class _Offset:
    """A seekable file viewed from ``start`` (so seek(0) means the caller's position)."""

    def __init__(self, fh: IO[bytes], start: int) -> None:
        self._fh, self._start = fh, start

    def seek(self, pos: int) -> int:
        return self._fh.seek(self._start + pos) - self._start

    def read(self, n: int = -1) -> bytes:
        return self._fh.read(n)
