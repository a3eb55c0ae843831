"""Async host-side client of the guest agent, over any asyncio byte stream.

One reader task decodes frames (:mod:`exec_sandbox.agent_protocol`) and routes each message by its
request id to the waiting call, so many requests run concurrently on one connection; the events of
one request (output, then exit) arrive in the order the agent sent them.

Failure mapping (see :mod:`exec_sandbox.errors`):

- the agent reported an error, or sent an invalid/oversize frame -> :class:`GuestAgentError`
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

from exec_sandbox.agent_protocol import (
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
from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestAgentError,
    SandboxError,
    SandboxInputError,
    SandboxTransientError,
)

__all__ = [
    "AgentClient",
    "AgentClientState",
    "ExecResult",
    "OutputCallback",
]

logger = logging.getLogger(__name__)

OutputCallback = Callable[[str], Awaitable[None] | None]
_M = TypeVar("_M", bound=BaseModel)


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


@dataclass(slots=True)
class _Pending:
    queue: asyncio.Queue[GuestMessage | _Dead]
    dispatched: bool = False


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
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max_frame = max_frame_bytes
        self.name = name
        self._decoder = FrameDecoder(max_frame_bytes=max_frame_bytes, resync=True)
        self._pending: dict[str, _Pending] = {}
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
                reader, writer = await asyncio.open_unix_connection(
                    os.fspath(path), limit=2 * MAX_FRAME_BYTES
                )
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
            self._pending[req_id] = _Pending(asyncio.Queue())
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
        """
        stdout: list[str] = []
        stderr: list[str] = []
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
                    (stdout if is_out else stderr).append(event.data)
                    callback = on_stdout if is_out else on_stderr
                    if callback is not None:
                        await _call_safely(callback, event.data)
                else:
                    exit_event = event
        if exit_event is None:  # pragma: no cover - exec_events raises instead of ending early
            raise GuestAgentError("exec ended without an exit event")
        event = exit_event
        return ExecResult(
            stdout="".join(stdout), stderr="".join(stderr), exit_code=event.exit_code,
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
        """Yield output events in order, then the exit event (last)."""
        request = _build(
            ExecRequest, id=self._new_id(), language=language, code=code, env=dict(env or {}),
            timeout_s=timeout_s, cwd=cwd, session=session, max_stdout_bytes=max_stdout_bytes,
            max_stderr_bytes=max_stderr_bytes, refill_spare=None if refill_spare else False,
            prime_spare=True if prime_spare else None,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s + reply_grace_s
        async with self._request(request) as (req_id, pending):
            finished = False
            try:
                while True:
                    msg = await self._next(req_id, pending, deadline - loop.time())
                    if isinstance(msg, OutputEvent):
                        yield msg
                    elif isinstance(msg, ExitEvent):
                        finished = True
                        yield msg
                        return
                    else:
                        raise _unexpected(req_id, msg, "output/exit")
            finally:
                if not finished and self._state is AgentClientState.READY:
                    # Cancelled or timed out here: ask the agent to kill the run (best effort).
                    with contextlib.suppress(SandboxError, OSError, ConnectionError):
                        await asyncio.shield(self._send(CancelRequest(id=self._new_id(), target=req_id)))

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
                    if not pending.queue.empty():
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
                        timeout: float = ...) -> bytes: ...

    @overload
    async def read_file(self, path: str, destination: Path | IO[bytes], *, chunk_size: int = ...,
                        timeout: float = ...) -> ReadResult: ...

    async def read_file(
        self,
        path: str,
        destination: Path | IO[bytes] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        timeout: float = 300.0,
    ) -> bytes | ReadResult:
        """Download ``path``: into memory (returns bytes) or into ``destination`` (returns ReadResult).

        Every chunk and the whole file are sha256-checked; a ``Path`` destination is written to a
        temporary sibling and renamed only when complete.
        """
        request = _build(ReadFileRequest, id=self._new_id(), path=path, chunk_size=chunk_size)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        buffer: list[bytes] = []
        whole = hashlib.sha256()
        tmp: Path | None = None
        sink: IO[bytes] | None = None
        if isinstance(destination, Path):
            tmp = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.part")
            sink = tmp.open("wb")
        elif destination is not None:
            sink = destination
        try:
            async with self._request(request) as (req_id, pending):
                seq = offset = 0
                while True:
                    msg = await self._next(req_id, pending, deadline - loop.time())
                    if isinstance(msg, FileChunk):
                        chunk = _b64(msg.data, req_id)
                        if msg.seq != seq or msg.offset != offset:
                            raise GuestAgentError(f"file chunk out of order (got {msg.seq}, want {seq})",
                                                  context={"request_id": req_id})
                        if hashlib.sha256(chunk).hexdigest() != msg.sha256:
                            raise GuestAgentError(f"file chunk {seq} failed its sha256 check",
                                                  context={"request_id": req_id, "path": path})
                        whole.update(chunk)
                        if sink is not None:
                            await asyncio.to_thread(sink.write, chunk)
                        else:
                            buffer.append(chunk)
                        seq += 1
                        offset += len(chunk)
                    elif isinstance(msg, ReadResult):
                        if msg.size != offset or msg.chunks != seq or msg.sha256 != whole.hexdigest():
                            raise GuestAgentError(
                                f"downloaded {offset} bytes / {seq} chunks with sha256 {whole.hexdigest()}, "
                                f"the guest announced {msg.size} / {msg.chunks} / {msg.sha256}",
                                context={"request_id": req_id, "path": path})
                        result = msg
                        break
                    else:
                        raise _unexpected(req_id, msg, "file_chunk/read_result")
            if tmp is not None and sink is not None:
                sink.close()
                assert isinstance(destination, Path)
                tmp.replace(destination)
                tmp = None
        finally:
            if tmp is not None:
                if sink is not None:
                    sink.close()
                tmp.unlink(missing_ok=True)
        return result if destination is not None else b"".join(buffer)

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
        ping_pending, reseed_pending = _Pending(asyncio.Queue()), _Pending(asyncio.Queue())
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
            if not ping_pending.queue.empty() or not reseed_pending.queue.empty():
                # The first ping arrived, so did the reseed behind it: its answer is on the way.
                result = await self._expect(reseed.id, reseed_pending, ReseedResult,
                                            max(deadline - loop.time(), 0.0))
                return hello, result
        finally:
            self._pending.pop(ping.id, None)
            self._pending.pop(reseed.id, None)
        return hello, await self.reseed_rng(seed, max(deadline - loop.time(), 0.0))

    async def shutdown(self, timeout: float = 10.0) -> ShutdownResult:
        """Ask the agent to stop (in a VM: power off). The transport closes soon after."""
        async with self._request(ShutdownRequest(id=self._new_id())) as (req_id, pending):
            return await self._expect(req_id, pending, ShutdownResult, timeout)

    # ------------------------------------------------------------------ internals

    def _new_id(self) -> str:
        # A per-client prefix keeps late replies meant for an earlier connection from matching.
        return f"{self._prefix}-{next(self._ids)}"

    def _check_usable(self) -> None:
        if self._state is AgentClientState.CLOSED:
            raise SandboxTransientError("the agent client is closed", context={"state": self._state.value})
        if self._state is AgentClientState.BROKEN:
            assert self._broken is not None
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
        pending = _Pending(asyncio.Queue())
        self._pending[req_id] = pending
        try:
            await self._send(request, pending)
            yield req_id, pending
        finally:
            self._pending.pop(req_id, None)

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
                msg = await pending.queue.get()
        except TimeoutError:
            raise CommunicationOutcomeUnknownError(
                "no answer from the guest agent in time", context={"request_id": req_id}
            ) from None
        if isinstance(msg, _Dead):
            raise msg.error
        if isinstance(msg, ErrorReply):
            raise GuestAgentError(f"guest agent refused the request: {msg.code}: {msg.message}",
                                  context={"request_id": req_id, "code": msg.code})
        return msg

    async def _expect(self, req_id: str, pending: _Pending, kind: type[_M], timeout: float) -> _M:
        msg = await self._next(req_id, pending, timeout)
        if not isinstance(msg, kind):
            raise _unexpected(req_id, msg, kind.__name__)
        return msg

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(256 * 1024)
                if not data:
                    self._break(CommunicationOutcomeUnknownError("the guest agent closed the connection"))
                    return
                self.last_heard_at = time.monotonic()
                for payload in self._decoder.feed(data):
                    self._route(payload)
        except asyncio.CancelledError:
            raise
        except FrameError as exc:
            self._break(exc)
        except (OSError, ConnectionError) as exc:
            self._break(CommunicationOutcomeUnknownError(f"reading from the guest agent failed: {exc}"))

    def _route(self, payload: bytes) -> None:
        try:
            msg = parse_guest_message(payload)
        except FrameError:
            if self.hello is None:
                return  # stale bytes from an earlier connection: skip until the first hello
            raise
        if isinstance(msg, Hello):
            self._on_hello(msg)
            return
        if msg.id is None:
            logger.warning("%s: agent error without request id: %s", self.name, msg)
            return
        pending = self._pending.get(msg.id)
        if pending is None:
            logger.debug("%s: ignoring %s for unknown request %s", self.name, msg.type, msg.id)
            return
        pending.queue.put_nowait(msg)

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
            self._pending[hello.id].queue.put_nowait(hello)

    def _break(self, error: SandboxError) -> None:
        if self._state in (AgentClientState.BROKEN, AgentClientState.CLOSED):
            return
        self._state = AgentClientState.BROKEN
        self._broken = error
        self._fail_all(error)

    def _fail_all(self, error: SandboxError, *, closed: bool = False) -> None:
        for req_id, pending in list(self._pending.items()):
            if isinstance(error, GuestAgentError):
                err: SandboxError = GuestAgentError(error.message, context={**error.context,
                                                                            "request_id": req_id})
            elif pending.dispatched:
                err = CommunicationOutcomeUnknownError(
                    error.message if not closed else "the agent client was closed during the request",
                    context={**error.context, "request_id": req_id})
            else:
                err = SandboxTransientError(error.message, context={**error.context, "request_id": req_id})
            pending.queue.put_nowait(_Dead(err))


# ---------------------------------------------------------------------- helpers


def _build(model: type[_M], **fields: Any) -> _M:
    try:
        return model(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise SandboxInputError(f"invalid {where}: {first.get('msg')}",
                                context={"field": where}) from None


def _unexpected(req_id: str, msg: GuestMessage, wanted: str) -> GuestAgentError:
    return GuestAgentError(f"unexpected {msg.type!r} message for request {req_id} (wanted {wanted})",
                           context={"request_id": req_id, "type": msg.type})


def _b64(data: str, req_id: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise GuestAgentError("file chunk is not valid base64", context={"request_id": req_id}) from None


async def _call_safely(callback: OutputCallback, data: str) -> None:
    try:
        result = callback(data)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("output callback failed; continuing")


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
