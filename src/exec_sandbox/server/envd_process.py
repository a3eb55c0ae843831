"""envd's ``process.Process`` service on the guest's background processes
(:meth:`Session.start_process <exec_sandbox.sandbox.session.Session.start_process>`).

- ``Start`` starts the process (stdin pipe on request, or a PTY) and streams ``start``, ``data``
  (stdout / stderr / pty bytes), a ``keepalive`` each second of silence, and ``end``. ``Connect``
  (by pid or tag) streams the same from now on, to any number of clients at once.
- ``SendInput`` / ``StreamInput`` write to its stdin or terminal, ``CloseStdin`` ends its stdin,
  ``Update`` resizes its terminal, ``SendSignal`` (SIGKILL: its whole process group; SIGTERM),
  ``List`` shows the running ones.

Lifetime, as envd's: a client that disconnects does not kill the process (the SDK's
``disconnect()`` then ``commands.connect(pid)`` must find it). It is killed at its deadline - the
client's stream timeout given to ``Start`` (the SDK's ``timeout``, 60 s by default for
``commands.run``; ``timeout=0``: none), at most the server's ``command_timeout_seconds`` - and with
its sandbox. Processes run as ``user`` (uid 1000, home ``/home/user``) unless the SDK asks for
``root``; commands run in ``bash`` (busybox ``sh`` in an image without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof

from exec_sandbox.client.process import ProcessChunk, ProcessExit, ProcessHandle
from exec_sandbox.errors import GuestAgentError, SandboxError, SandboxInputError
from exec_sandbox.server import metrics
from exec_sandbox.server.envd_common import E2B_HOME, as_root, current_record
from exec_sandbox.server.proto.process import process_pb as pr_pb
from exec_sandbox.server.registry import SandboxRecord
from exec_sandbox.validation import validate_env_vars

__all__ = ["EnvdProcess", "ProcessService", "command_argv"]

logger = logging.getLogger(__name__)

_SHELLS: Final = frozenset({"/bin/bash", "bash", "/usr/bin/bash", "/bin/sh", "sh", "/usr/bin/sh"})
_KEEPALIVE_S: Final = 1.0
_MAX_PROCESSES: Final = 32  # running at once per sandbox
#: Output one process may send per stream (the host never holds it: see ProcessHandle's ring).
_MAX_OUTPUT_BYTES: Final = 1 << 40
_SIGNALS: Final = {pr_pb.Signal.SIGKILL: 9, pr_pb.Signal.SIGTERM: 15}

_R = TypeVar("_R", pr_pb.StartResponse, pr_pb.ConnectResponse)


@dataclass
class EnvdProcess:
    """A process of one sandbox as envd lists it."""

    info: pr_pb.ProcessInfo
    handle: ProcessHandle


def command_argv(cmd: str, args: list[str], shell: str) -> list[str]:
    """The argv for an envd ``ProcessConfig``: a shell (the SDK sends ``/bin/bash -l -c CMD``) is
    the guest's ``shell``; anything else runs as given."""
    if cmd in _SHELLS:
        return [shell, *args]
    return [cmd, *args]


def _processes(record: SandboxRecord) -> dict[int, EnvdProcess]:
    return record.processes


def _select(record: SandboxRecord, selector: pr_pb.ProcessSelector | None) -> EnvdProcess:
    """The running process a ``ProcessSelector`` (pid or tag) names, or a NOT_FOUND error."""
    procs = _processes(record)
    match selector.selector if selector is not None else None:
        case Oneof(field="pid", value=int() as pid):
            if pid in procs:
                return procs[pid]
            raise ConnectError(Code.NOT_FOUND, f"process {pid} not found")
        case Oneof(field="tag", value=str() as tag):
            for entry in procs.values():
                if entry.info.tag == tag:
                    return entry
            raise ConnectError(Code.NOT_FOUND, f"no process with tag {tag!r}")
        case _:
            raise ConnectError(Code.INVALID_ARGUMENT, "a process pid or tag is required")


def _deadline(record: SandboxRecord, client_timeout_ms: float | None) -> float | None:
    if not client_timeout_ms:
        return None
    return max(0.1, min(client_timeout_ms / 1000.0, record.command_timeout_seconds))


def _guest_failure(exc: SandboxError, what: str) -> ConnectError:
    if isinstance(exc, SandboxInputError):
        return ConnectError(Code.INVALID_ARGUMENT, exc.message)
    if isinstance(exc, GuestAgentError):
        code = exc.context.get("code")
        if code == "not_found":
            return ConnectError(Code.NOT_FOUND, exc.message)
        if code in ("no_stdin", "stdin_closed", "no_pty", "spawn_failed", "invalid_request"):
            return ConnectError(Code.FAILED_PRECONDITION, f"{what}: {exc.message}")
    return ConnectError(Code.UNAVAILABLE, f"{what}: {exc.message}")


def _cwd(requested: str | None, home: str) -> str:
    """The process's working directory as the SDK names it (relative: from the user's home).
    ``/home/user`` is a link to the guest's work dir, so the shell's ``pwd`` shows E2B's path."""
    if requested and "\x00" in requested:
        raise ConnectError(Code.INVALID_ARGUMENT, "cwd must not contain NUL characters")
    return posixpath.normpath(posixpath.join(home, requested)) if requested else home


async def _start_process(record: SandboxRecord, request: pr_pb.StartRequest, root: bool,
                         timeout_s: float | None) -> ProcessHandle:
    config = request.process
    assert config is not None
    name, home = ("root", "/root") if root else ("user", E2B_HOME)
    cwd = _cwd(config.cwd, home)
    try:
        env = {"HOME": home, "USER": name, "LOGNAME": name, "PWD": cwd,
               **record.env_vars, **validate_env_vars(dict(config.envs))}
    except SandboxInputError as exc:
        raise ConnectError(Code.INVALID_ARGUMENT, exc.message) from None
    pty = None
    if request.pty is not None:
        size = request.pty.size
        pty = (size.rows, size.cols) if size is not None else (24, 80)
    last: SandboxError | None = None
    # bash where the image has it, else busybox sh (the SDK always asks for /bin/bash).
    for shell in ("/bin/bash", "/bin/sh"):
        argv = command_argv(config.cmd, list(config.args), shell)
        try:
            return await record.session.start_process(
                argv, env_vars=env, cwd=cwd, root=root, stdin=bool(request.stdin) or pty is not None,
                pty=pty, timeout_seconds=timeout_s, max_output_bytes=_MAX_OUTPUT_BYTES)
        except SandboxError as exc:
            last = exc
            if not (config.cmd in _SHELLS and isinstance(exc, GuestAgentError)
                    and exc.context.get("code") == "spawn_failed"):
                break
    assert last is not None
    raise _guest_failure(last, "the process could not start")


def _event(kind: type[_R], name: str, value: Any) -> _R:
    return kind(event=pr_pb.ProcessEvent(event=Oneof(name, value)))  # type: ignore[arg-type]


def _data(kind: type[_R], chunk: ProcessChunk) -> _R:
    data = pr_pb.ProcessEvent.DataEvent(output=Oneof(chunk.stream, chunk.data))  # type: ignore[arg-type]
    return _event(kind, "data", data)


def _end(done: ProcessExit) -> pr_pb.ProcessEvent.EndEvent:
    if done.timed_out:
        return pr_pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status="signal: killed",
                                           error="the command timed out")
    if done.signal is not None:
        name = {9: "killed", 15: "terminated"}.get(done.signal, str(done.signal))
        return pr_pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=f"signal: {name}")
    return pr_pb.ProcessEvent.EndEvent(exit_code=done.exit_code, exited=True,
                                       status=f"exit status {done.exit_code}")


async def _stream(kind: type[_R], handle: ProcessHandle, *, replay: bool) -> AsyncIterator[_R]:
    """start, data..., end of ``handle``, with a keepalive each second of silence (like envd's: it
    also makes a write that notices a client gone)."""
    yield _event(kind, "start", pr_pb.ProcessEvent.StartEvent(pid=handle.pid))
    chunks = handle.output(replay=replay)
    nxt: asyncio.Future[ProcessChunk] | None = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait({nxt}, timeout=_KEEPALIVE_S)
            if not done:  # the same pending read is awaited again: its chunk is not lost
                yield _event(kind, "keepalive", pr_pb.ProcessEvent.KeepAlive())
                continue
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                break
            except SandboxError as exc:
                raise ConnectError(Code.UNAVAILABLE, f"the sandbox lost the process: {exc.message}") from None
            finally:
                nxt = None
            yield _data(kind, chunk)
        try:
            done_exit = await handle.wait()
        except SandboxError as exc:
            raise ConnectError(Code.UNAVAILABLE, f"the sandbox lost the process: {exc.message}") from None
        yield _event(kind, "end", _end(done_exit))
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt
        await chunks.aclose()  # type: ignore[attr-defined]


class ProcessService:
    """``process.Process`` on the sandbox's background processes (see the module docstring)."""

    async def list(self, request: pr_pb.ListRequest, ctx: RequestContext[Any, Any], /) -> pr_pb.ListResponse:
        record = current_record()
        return pr_pb.ListResponse(processes=[p.info for p in _processes(record).values()])

    async def start(
        self, request: pr_pb.StartRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pr_pb.StartResponse]:
        record = current_record()
        config = request.process
        if config is None or not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        root = as_root(ctx)
        procs = _processes(record)
        if len(procs) >= _MAX_PROCESSES:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"{_MAX_PROCESSES} processes are running already")
        handle = await _start_process(record, request, root, _deadline(record, ctx.timeout_ms))
        pid = handle.pid
        procs[pid] = EnvdProcess(pr_pb.ProcessInfo(config=config, pid=pid, tag=request.tag), handle)
        started = time.monotonic()

        def ended() -> None:
            if procs.get(pid) is not None and procs[pid].handle is handle:
                del procs[pid]
            metrics.observe_run("command", time.monotonic() - started)

        handle.on_done(ended)
        async for event in _stream(pr_pb.StartResponse, handle, replay=True):
            yield event

    async def connect(
        self, request: pr_pb.ConnectRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pr_pb.ConnectResponse]:
        entry = _select(current_record(), request.process)
        async for event in _stream(pr_pb.ConnectResponse, entry.handle, replay=False):
            yield event

    async def update(
        self, request: pr_pb.UpdateRequest, ctx: RequestContext[Any, Any], /
    ) -> pr_pb.UpdateResponse:
        entry = _select(current_record(), request.process)
        size = request.pty.size if request.pty is not None else None
        if size is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "pty.size is required")
        try:
            await entry.handle.resize(size.rows, size.cols)
        except SandboxError as exc:
            raise _guest_failure(exc, "resize failed") from None
        return pr_pb.UpdateResponse()

    async def _write(self, entry: EnvdProcess, payload: pr_pb.ProcessInput | None) -> None:
        match payload.input if payload is not None else None:
            case Oneof(field="stdin" | "pty", value=bytes() as data):
                pass
            case _:
                raise ConnectError(Code.INVALID_ARGUMENT, "input.stdin or input.pty is required")
        try:
            await entry.handle.send_input(data)
        except SandboxError as exc:
            raise _guest_failure(exc, "input failed") from None

    async def send_input(
        self, request: pr_pb.SendInputRequest, ctx: RequestContext[Any, Any], /
    ) -> pr_pb.SendInputResponse:
        await self._write(_select(current_record(), request.process), request.input)
        return pr_pb.SendInputResponse()

    async def stream_input(
        self, request: AsyncIterator[pr_pb.StreamInputRequest], ctx: RequestContext[Any, Any], /
    ) -> pr_pb.StreamInputResponse:
        record = current_record()
        entry: EnvdProcess | None = None
        async for message in request:
            match message.event:
                case Oneof(field="start", value=pr_pb.StreamInputRequest.StartEvent() as start):
                    entry = _select(record, start.process)
                case Oneof(field="data", value=pr_pb.StreamInputRequest.DataEvent() as data):
                    if entry is None:
                        raise ConnectError(Code.INVALID_ARGUMENT, "the stream must start with a start event")
                    await self._write(entry, data.input)
                case _:
                    pass  # keepalive
        return pr_pb.StreamInputResponse()

    async def close_stdin(
        self, request: pr_pb.CloseStdinRequest, ctx: RequestContext[Any, Any], /
    ) -> pr_pb.CloseStdinResponse:
        entry = _select(current_record(), request.process)
        try:
            await entry.handle.close_stdin()
        except SandboxError as exc:
            raise _guest_failure(exc, "closing stdin failed") from None
        return pr_pb.CloseStdinResponse()

    async def send_signal(
        self, request: pr_pb.SendSignalRequest, ctx: RequestContext[Any, Any], /
    ) -> pr_pb.SendSignalResponse:
        """SIGKILL: the process's whole group (its cgroup in the guest), waited for; SIGTERM."""
        entry = _select(current_record(), request.process)
        sig = _SIGNALS.get(request.signal)
        if sig is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "signal must be SIGKILL or SIGTERM")
        try:
            if sig == 9:
                await entry.handle.kill()
            else:
                await entry.handle.signal(sig)
        except GuestAgentError as exc:
            if exc.context.get("code") != "not_found":  # it ended meanwhile: nothing left to signal
                raise _guest_failure(exc, "signal failed") from None
        except SandboxError as exc:
            raise _guest_failure(exc, "signal failed") from None
        return pr_pb.SendSignalResponse()

