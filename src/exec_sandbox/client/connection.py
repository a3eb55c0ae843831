"""The agent connection: one asyncio byte stream, one reader task, requests routed by id.

:class:`AgentConnection` owns the transport and its lifecycle (:class:`AgentClientState`), the frame
decoder, the byte-budgeted per-request queues and the failure mapping of the transport; the request
methods live in :class:`~exec_sandbox.client.files.FileTransfer` and
:class:`~exec_sandbox.client.agent.AgentClient` on top of it. Bounds and error mapping: see
:mod:`exec_sandbox.client.agent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from enum import StrEnum
from types import TracebackType
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ValidationError

from exec_sandbox.callbacks import TextCallback
from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestAgentError,
    GuestProtocolError,
    SandboxError,
    SandboxInputError,
    SandboxTransientError,
)
from exec_sandbox.protocol.agent import (
    MAX_FRAME_BYTES,
    ErrorReply,
    FrameDecoder,
    FrameError,
    GuestMessage,
    Hello,
    HostRequest,
    encode_frame,
    parse_guest_message,
)

__all__ = [
    "DEFAULT_MAX_READ_BYTES",
    "DEFAULT_QUEUE_BUDGET_BYTES",
    "DEFAULT_REQUEST_QUEUE_BYTES",
    "DEFAULT_STALL_TIMEOUT_S",
    "AgentClientState",
    "AgentConnection",
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
NOTE_SLACK_CHARS = 64 * 1024
#: Frames for requests never made / id-less errors tolerated on one connection after the hello.
_MAX_STRAY_FRAMES = 16
#: Requests given up on whose late frames are still dropped quietly (oldest forgotten first).
_MAX_ABANDONED = 4096

OutputCallback = TextCallback
_M = TypeVar("_M", bound=BaseModel)
_R = TypeVar("_R")


class AgentClientState(StrEnum):
    NEW = "new"  # constructed, reader not started
    CONNECTED = "connected"  # reading; no hello seen yet
    READY = "ready"  # the agent said hello
    BROKEN = "broken"  # protocol violation or transport death; every call fails
    CLOSED = "closed"  # aclose() was called


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


class Pending:
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


class AgentConnection:
    """One guest agent connection: transport, reader task, request routing, lifecycle.

    Use ``async with`` or :meth:`open_unix`; the request methods are on the subclasses.
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
        self._pending: dict[str, Pending] = {}
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
    ) -> Self:
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
    async def _request(self, request: HostRequest) -> AsyncIterator[tuple[str, Pending]]:
        self._check_usable()
        if self._state is not AgentClientState.READY:
            raise SandboxTransientError("the guest agent is not ready (call wait_ready first)",
                                        context={"state": self._state.value})
        req_id = request.id
        pending = Pending(self._budget)
        self._pending[req_id] = pending
        try:
            await self._send(request, pending)
            yield req_id, pending
        finally:
            self._pending.pop(req_id, None)
            if not pending.completed:
                self._forget(req_id)

    async def _send_all(self, *requests: tuple[HostRequest, Pending]) -> None:
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

    async def _send(self, request: HostRequest, pending: Pending | None = None) -> None:
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

    async def _next(self, req_id: str, pending: Pending, timeout: float) -> GuestMessage:
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

    async def _expect(self, req_id: str, pending: Pending, kind: type[_M], timeout: float) -> _M:
        msg = await self._next(req_id, pending, timeout)
        if not isinstance(msg, kind):
            raise self._violation(unexpected_frame(req_id, msg, kind.__name__))
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

    async def _deliver(self, req_id: str, pending: Pending, msg: GuestMessage, cost: int) -> None:
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

    def _abandon(self, req_id: str, pending: Pending, cost: int) -> None:
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


def build_model(model: type[_M], **fields: Any) -> _M:
    try:
        return model(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise SandboxInputError(f"invalid {where}: {first.get('msg')}",
                                context={"field": where}) from None


def unexpected_frame(req_id: str, msg: GuestMessage, wanted: str) -> GuestProtocolError:
    return GuestProtocolError(f"unexpected {msg.type!r} message for request {req_id} (wanted {wanted})",
                              reason="unexpected_message", request_id=req_id, context={"type": msg.type})
