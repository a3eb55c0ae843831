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
import io
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

from exec_sandbox.callbacks import call_safely
from exec_sandbox.client.connection import (
    DEFAULT_MAX_READ_BYTES,
    DEFAULT_QUEUE_BUDGET_BYTES,
    DEFAULT_REQUEST_QUEUE_BYTES,
    DEFAULT_STALL_TIMEOUT_S,
    NOTE_SLACK_CHARS,
    AgentClientState,
    OutputCallback,
    Pending,
    build_model,
    unexpected_frame,
)
from exec_sandbox.client.files import FileTransfer
from exec_sandbox.client.process import ProcessControl
from exec_sandbox.client.watch import WatchControl
from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestAgentError,
    GuestProtocolError,
    SandboxError,
    SandboxInputError,
    SandboxTransientError,
)
from exec_sandbox.protocol.agent import (
    DEFAULT_OUTPUT_CAP_BYTES,
    CancelRequest,
    CancelResult,
    ExecRequest,
    ExitEvent,
    Hello,
    Language,
    NetConfigRequest,
    NetResult,
    OutputEvent,
    PingRequest,
    ReseedRequest,
    ReseedResult,
    ShutdownRequest,
    ShutdownResult,
    WarmupRequest,
    WarmupResult,
)

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


class AgentClient(FileTransfer, ProcessControl, WatchControl):
    """Client of one guest agent connection.

    Use ``async with AgentClient(reader, writer) as agent: await agent.wait_ready()`` or
    :meth:`open_unix` for a unix socket (e.g. QEMU's virtio-serial chardev socket).
    """

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
            self._pending[req_id] = Pending(self._budget)
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
                        await call_safely(
                            callback, event.data, what="output", logger=logger, failures=failures
                        )
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
        request = build_model(
            ExecRequest, id=self._new_id(), language=language, code=code, env=dict(env or {}),
            timeout_s=timeout_s, cwd=cwd, session=session, max_stdout_bytes=max_stdout_bytes,
            max_stderr_bytes=max_stderr_bytes, refill_spare=None if refill_spare else False,
            prime_spare=True if prime_spare else None,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s + reply_grace_s
        caps = {"stdout": max_stdout_bytes + NOTE_SLACK_CHARS,
                "stderr": max_stderr_bytes + NOTE_SLACK_CHARS}
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
                                f"(the cap it was given is {caps[msg.stream] - NOTE_SLACK_CHARS} bytes)",
                                reason="output_cap", request_id=req_id, limit_bytes=caps[msg.stream],
                                received_bytes=seen[msg.stream], context={"stream": msg.stream}))
                        yield msg
                    elif isinstance(msg, ExitEvent):
                        finished = pending.completed = True
                        yield msg
                        return
                    else:
                        raise self._violation(unexpected_frame(req_id, msg, "output/exit"))
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
        request = build_model(WarmupRequest, id=self._new_id(), languages=list(languages), session=session,
                         spare=spare)
        async with self._request(request) as (req_id, pending):
            return await self._expect(req_id, pending, WarmupResult, timeout)

    # ------------------------------------------------------------------ misc

    def _reseed_request(self, seed: bytes) -> ReseedRequest:
        return ReseedRequest(id=self._new_id(), seed=base64.b64encode(seed).decode(),
                             wall_time_ns=time.time_ns())

    async def reseed_rng(self, seed: bytes | None = None, timeout: float = 10.0) -> ReseedResult:
        """Mix fresh host randomness into the guest's RNG and set its wall clock to the host's
        (call after every snapshot restore)."""
        seed = secrets.token_bytes(64) if seed is None else seed
        if not 16 <= len(seed) <= 4096:
            raise SandboxInputError("seed must be 16..4096 bytes")
        async with self._request(self._reseed_request(seed)) as (req_id, pending):
            return await self._expect(req_id, pending, ReseedResult, timeout)

    async def configure_network(
        self, *, address: str, prefix: int, nameserver: str, mac: str | None = None,
        ca_bundle: str | None = None, timeout: float = 10.0,
    ) -> NetResult:
        """Bring the guest NIC up: address/prefix, MAC, resolver (TCP only) and the trust bundle."""
        request = build_model(NetConfigRequest, id=self._new_id(), address=address, prefix=prefix,
                              nameserver=nameserver, mac=mac, ca_bundle=ca_bundle)
        async with self._request(request) as (req_id, pending):
            return await self._expect(req_id, pending, NetResult, timeout)

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
        reseed = self._reseed_request(seed)
        ping_pending, reseed_pending = Pending(self._budget), Pending(self._budget)
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
