"""The in-sandbox daemon (E2B's "envd") API, served on the host for each sandbox.

- ``process.Process`` (Connect RPC, via ``connectrpc`` with our own stubs): ``Start`` runs a command
  as a one-shot ``/bin/sh`` (busybox) in the sandbox's VM, as the guest's unprivileged user, and
  streams ``start`` / ``data`` (stdout, stderr) / ``keepalive`` / ``end`` events; commands run side
  by side; ``bash -c X`` / ``sh -c X`` become ``X``. ``List`` shows the running commands,
  ``SendSignal`` kills one (its whole process tree); a client that leaves gets its command killed.
- ``filesystem.Filesystem``: ``Stat``, ``ListDir``, ``MakeDir``, ``Move``, ``Remove`` (through the
  guest's shell tools).
- ``/files`` and ``/health`` are in :mod:`exec_sandbox.server.files`.

Paths: E2B's home ``/home/user`` is mapped onto our guest work dir ``/home/sandbox``; relative paths
start there. The sandbox a request is for is set by the app (from ``E2b-Sandbox-Id`` and the access
token) in :data:`CURRENT_SANDBOX` before these handlers run.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import posixpath
import shlex
import time
from collections.abc import AsyncIterator
from typing import Any, Final, Literal

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from exec_sandbox.client.agent import ExecResult, OutputCallback
from exec_sandbox.errors import SandboxError, SandboxInputError
from exec_sandbox.models import ExecutionResult
from exec_sandbox.server import metrics
from exec_sandbox.server.errors import BadRequestError, ServeError
from exec_sandbox.server.proto.filesystem import filesystem_pb as fs_pb
from exec_sandbox.server.proto.filesystem.filesystem_connect import FilesystemASGIApplication
from exec_sandbox.server.proto.process import process_pb as pr_pb
from exec_sandbox.server.proto.process.process_connect import ProcessASGIApplication
from exec_sandbox.server.registry import SandboxRecord
from exec_sandbox.validation import DEFAULT_WORKDIR, validate_code, validate_env_vars
from exec_sandbox.vm.execution import execute_in_vm

__all__ = [
    "CURRENT_SANDBOX",
    "E2B_HOME",
    "FS_TIMEOUT_S",
    "FilesystemService",
    "ProcessService",
    "command_script",
    "guest_path",
    "parse_stat_line",
]

logger = logging.getLogger(__name__)

CURRENT_SANDBOX: contextvars.ContextVar[SandboxRecord] = contextvars.ContextVar("sbx_serve_sandbox")
E2B_HOME: Final = "/home/user"
_SHELLS: Final = frozenset({"/bin/bash", "bash", "/usr/bin/bash", "/bin/sh", "sh", "/usr/bin/sh"})
_STAT_FMT: Final = "%F|%s|%a|%A|%U|%G|%Y|%n"
FS_TIMEOUT_S: Final = 60.0
_KEEPALIVE_S: Final = 1.0
_MAX_COMMANDS: Final = 32  # running at once per sandbox


def guest_path(path: str) -> str:
    """The guest path for an SDK path: ``/home/user`` is our work dir; relative paths start there."""
    if not path:
        raise BadRequestError("path must not be empty")
    if "\x00" in path:
        raise BadRequestError("path must not contain NUL characters")
    if path == E2B_HOME or path.startswith(E2B_HOME + "/"):
        path = DEFAULT_WORKDIR + path[len(E2B_HOME) :]
    elif path == "~" or path.startswith("~/"):
        path = DEFAULT_WORKDIR + path[1:]
    if not path.startswith("/"):
        path = posixpath.join(DEFAULT_WORKDIR, path)
    return posixpath.normpath(path)


def command_script(cmd: str, args: list[str], cwd: str | None) -> str:
    """The shell text that runs an envd ``ProcessConfig`` in the guest's ``/bin/sh``, in a subshell."""
    if cmd in _SHELLS and len(args) >= 2 and args[-2] == "-c" and all(a.startswith("-") for a in args[:-1]):
        script = args[-1]
    else:
        script = shlex.join([cmd, *args])
    where = guest_path(cwd) if cwd else DEFAULT_WORKDIR
    return f"(cd {shlex.quote(where)} && {script}\n)"


def parse_stat_line(line: str) -> fs_pb.EntryInfo:
    """An ``EntryInfo`` from one ``stat -c '%F|%s|%a|%A|%U|%G|%Y|%n'`` line (name last: it may hold ``|``)."""
    kind, size, mode, perms, owner, group, mtime, name = line.split("|", 7)
    ftype = {
        "directory": fs_pb.FileType.DIRECTORY,
        "symbolic link": fs_pb.FileType.SYMLINK,
    }.get(kind, fs_pb.FileType.FILE)
    return fs_pb.EntryInfo(
        name=posixpath.basename(name) or name,
        type=ftype,
        path=name,
        size=int(size),
        mode=int(mode, 8),
        permissions=perms,
        owner=owner,
        group=group,
        modified_time=Timestamp(seconds=int(mtime)),
        is_symlink=kind == "symbolic link",
    )


def _record() -> SandboxRecord:
    try:
        return CURRENT_SANDBOX.get()
    except LookupError:  # the app always sets it; a missing one is a routing bug, not the caller's
        raise ConnectError(Code.INTERNAL, "no sandbox bound to this request") from None


async def _shell(record: SandboxRecord, script: str) -> ExecutionResult:
    try:
        return await record.session.exec(script, timeout_seconds=FS_TIMEOUT_S)
    except SandboxInputError as exc:
        raise ConnectError(Code.INVALID_ARGUMENT, exc.message) from None
    except SandboxError as exc:
        raise ConnectError(Code.UNAVAILABLE, f"sandbox unavailable: {exc.message}") from None


def _fs_error(result: ExecutionResult, path: str) -> ConnectError:
    text = result.stderr.strip() or result.stdout.strip() or f"exit code {result.exit_code}"
    if "No such file" in text or "can't stat" in text:
        return ConnectError(Code.NOT_FOUND, f"path {path!r} not found: {text}")
    if "Permission denied" in text:
        return ConnectError(Code.PERMISSION_DENIED, text)
    if "File exists" in text:
        return ConnectError(Code.ALREADY_EXISTS, text)
    return ConnectError(Code.INVALID_ARGUMENT, text)


async def _stat(record: SandboxRecord, path: str) -> fs_pb.EntryInfo:
    result = await _shell(record, f"stat -c {shlex.quote(_STAT_FMT)} -- {shlex.quote(path)}")
    if result.exit_code != 0 or not result.stdout.strip():
        raise _fs_error(result, path)
    return parse_stat_line(result.stdout.rstrip("\n").split("\n")[-1])


def _path_or_error(path: str) -> str:
    try:
        return guest_path(path)
    except ServeError as exc:
        raise ConnectError(Code.INVALID_ARGUMENT, exc.message) from None


class ProcessService:
    """``process.Process``: commands in the sandbox's shell session."""

    async def list(self, request: pr_pb.ListRequest, ctx: RequestContext[Any, Any], /) -> pr_pb.ListResponse:
        record = _record()
        return pr_pb.ListResponse(processes=list(record_processes(record).values()))

    async def start(
        self, request: pr_pb.StartRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pr_pb.StartResponse]:
        record = _record()
        config = request.process
        if config is None or not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        if request.pty is not None:
            raise ConnectError(Code.UNIMPLEMENTED, "PTY processes are not supported by sbx serve")
        cwd = config.cwd if config.cwd else None
        try:
            script = command_script(config.cmd, list(config.args), cwd)
        except ServeError as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, exc.message) from None
        try:
            env = {**record.env_vars, **validate_env_vars(dict(config.envs))}
        except SandboxInputError as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, exc.message) from None
        if len(record.process_tasks) >= _MAX_COMMANDS:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"{_MAX_COMMANDS} commands are running already")
        pid = record.new_pid()
        queue: asyncio.Queue[tuple[Literal["stdout", "stderr"], str]] = asyncio.Queue()
        exec_task = asyncio.get_running_loop().create_task(
            _run_command(
                record,
                script,
                env,
                _record_timeout(record, ctx.timeout_ms),
                on_stdout=lambda s: queue.put_nowait(("stdout", s)),
                on_stderr=lambda s: queue.put_nowait(("stderr", s)),
            ),
            name=f"sbx-serve-cmd-{record.sandbox_id}-{pid}",
        )
        record_processes(record)[pid] = pr_pb.ProcessInfo(config=config, pid=pid, tag=request.tag)
        started = time.monotonic()
        record.process_tasks[pid] = (exec_task, started)
        exec_task.add_done_callback(lambda _t: metrics.observe_run("command", time.monotonic() - started))
        try:
            yield _start(pid)
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {getter, exec_task}, timeout=_KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:  # like envd: a keepalive, and a write that notices a client gone
                    getter.cancel()
                    yield _keepalive()
                    continue
                if getter in done:
                    stream, text = getter.result()
                    yield _data(stream, text)
                    continue
                getter.cancel()
                while not queue.empty():
                    stream, text = queue.get_nowait()
                    yield _data(stream, text)
                break
            if exec_task.cancelled():  # SendSignal: the guest agent killed the run
                yield _end_killed()
                return
            try:
                result = exec_task.result()
            except SandboxInputError as exc:
                raise ConnectError(Code.INVALID_ARGUMENT, exc.message) from None
            except SandboxError as exc:
                raise ConnectError(Code.UNAVAILABLE, f"the command failed: {exc.message}") from None
            yield _end(result)
        finally:
            record_processes(record).pop(pid, None)
            record.process_tasks.pop(pid, None)
            if not exec_task.done():
                # The client went away mid-stream and nobody can reach this command again (no
                # Process.Connect): cancelling the exec makes the guest agent kill its process tree,
                # which frees the sandbox's shell for the next command.
                _cancel_exec(exec_task, started)
                exec_task.add_done_callback(_log_orphan)

    async def connect(
        self, request: pr_pb.ConnectRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pr_pb.ConnectResponse]:
        raise ConnectError(Code.UNIMPLEMENTED, "Process.Connect is not implemented by sbx serve")
        yield  # pragma: no cover - makes this an async generator

    async def update(self, request: Any, ctx: RequestContext[Any, Any], /) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, "Process.Update (PTY resize) is not implemented by sbx serve")

    async def stream_input(self, request: Any, ctx: RequestContext[Any, Any], /) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, "stdin is not implemented by sbx serve")

    async def send_input(self, request: Any, ctx: RequestContext[Any, Any], /) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, "stdin is not implemented by sbx serve")

    async def send_signal(
        self, request: pr_pb.SendSignalRequest, ctx: RequestContext[Any, Any], /
    ) -> pr_pb.SendSignalResponse:
        """SIGKILL / SIGTERM: the command's whole process tree is killed by the guest agent."""
        record = _record()
        pid = _select(record, request.process)
        running = record.process_tasks.get(pid)
        if running is None:
            raise ConnectError(Code.NOT_FOUND, f"process {pid} not found")
        task, started = running
        _cancel_exec(task, started)
        await asyncio.wait({task})
        return pr_pb.SendSignalResponse()

    async def close_stdin(self, request: Any, ctx: RequestContext[Any, Any], /) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, "stdin is not implemented by sbx serve")


async def _run_command(
    record: SandboxRecord,
    script: str,
    env: dict[str, str],
    timeout_s: float,
    *,
    on_stdout: OutputCallback,
    on_stderr: OutputCallback,
) -> ExecResult:
    """One command as a one-shot ``sh`` in the sandbox's VM, beside the session's shell.

    Not through ``Session.exec``: that runs one call at a time, and E2B's commands run side by side
    (a background server and the commands that talk to it). It is the same exec path
    (:func:`~exec_sandbox.vm.execution.execute_in_vm`: output caps, OOM notes), in the same guest and
    file system; what differs is that nothing (``cd``, ``export``) carries over between commands,
    which is E2B's behaviour too.
    """
    cfg = record.scheduler_config
    code = validate_code(script, max_bytes=cfg.max_code_bytes)
    outcome = await execute_in_vm(
        record.session.vm,
        code,
        language="raw",
        session=False,
        timeout_s=timeout_s,
        env=env,
        max_output_bytes=cfg.max_output_bytes,
        memory_mb=record.memory_mb,
        on_stdout=on_stdout,
        on_stderr=on_stderr,
    )
    return outcome.result


def record_processes(record: SandboxRecord) -> dict[int, pr_pb.ProcessInfo]:
    return record.processes


def _select(record: SandboxRecord, selector: pr_pb.ProcessSelector | None) -> int:
    """The pid a ``ProcessSelector`` (pid or tag) names, or a NOT_FOUND Connect error."""
    match selector.selector if selector is not None else None:
        case Oneof(field="pid", value=int() as pid):
            return pid
        case Oneof(field="tag", value=str() as tag):
            for pid, info in record_processes(record).items():
                if info.tag == tag:
                    return pid
            raise ConnectError(Code.NOT_FOUND, f"no process with tag {tag!r}")
        case _:
            raise ConnectError(Code.INVALID_ARGUMENT, "a process pid or tag is required")


def _record_timeout(record: SandboxRecord, client_timeout_ms: float | None) -> float:
    """A command may run until the sandbox's deadline, at most ``command_timeout_seconds``, and no
    longer than the client waits for it (the SDK's ``timeout``, sent as ``Connect-Timeout-Ms``): the
    guest then kills it, so an abandoned command does not hold the sandbox's shell."""
    limit = min(record.end_at - time.time(), record.command_timeout_seconds)
    if client_timeout_ms:
        limit = min(limit, client_timeout_ms / 1000.0)
    return max(1.0, limit)


def _cancel_exec(task: asyncio.Task[Any], started: float) -> None:
    """Cancel a command's exec (the agent client then asks the guest to kill its process tree).

    At once, however young the run (``started`` is not needed any more): the guest agent remembers a
    cancel that overtakes its run and refuses or stops that run, so the shell is never held.
    """
    task.cancel()


def _log_orphan(task: asyncio.Task[ExecResult]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.info("a command whose client left ended with %r", task.exception())


def _keepalive() -> pr_pb.StartResponse:
    event: Oneof[Literal["keepalive"], pr_pb.ProcessEvent.KeepAlive] = Oneof(
        "keepalive", pr_pb.ProcessEvent.KeepAlive()
    )
    return pr_pb.StartResponse(event=pr_pb.ProcessEvent(event=event))


def _end_killed() -> pr_pb.StartResponse:
    end = pr_pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status="signal: killed")
    event: Oneof[Literal["end"], pr_pb.ProcessEvent.EndEvent] = Oneof("end", end)
    return pr_pb.StartResponse(event=pr_pb.ProcessEvent(event=event))


def _start(pid: int) -> pr_pb.StartResponse:
    event: Oneof[Literal["start"], pr_pb.ProcessEvent.StartEvent] = Oneof(
        "start", pr_pb.ProcessEvent.StartEvent(pid=pid)
    )
    return pr_pb.StartResponse(event=pr_pb.ProcessEvent(event=event))


def _end(result: ExecResult) -> pr_pb.StartResponse:
    event: Oneof[Literal["end"], pr_pb.ProcessEvent.EndEvent] = Oneof("end", _end_event(result))
    return pr_pb.StartResponse(event=pr_pb.ProcessEvent(event=event))


def _data(stream: Literal["stdout", "stderr"], text: str) -> pr_pb.StartResponse:
    out: Oneof[Literal["stdout"], bytes] | Oneof[Literal["stderr"], bytes]
    if stream == "stdout":
        out = Oneof[Literal["stdout"], bytes]("stdout", text.encode())
    else:
        out = Oneof[Literal["stderr"], bytes]("stderr", text.encode())
    event: Oneof[Literal["data"], pr_pb.ProcessEvent.DataEvent] = Oneof(
        "data", pr_pb.ProcessEvent.DataEvent(output=out)
    )
    return pr_pb.StartResponse(event=pr_pb.ProcessEvent(event=event))


def _end_event(result: ExecResult) -> pr_pb.ProcessEvent.EndEvent:
    if result.timed_out:
        return pr_pb.ProcessEvent.EndEvent(
            exit_code=-1, exited=False, status="signal: killed", error="the command timed out"
        )
    if result.signal is not None:
        return pr_pb.ProcessEvent.EndEvent(
            exit_code=result.exit_code, exited=False, status=f"signal: {result.signal}"
        )
    return pr_pb.ProcessEvent.EndEvent(
        exit_code=result.exit_code, exited=True, status=f"exit status {result.exit_code}"
    )


class FilesystemService:
    """``filesystem.Filesystem`` through the guest's shell tools (busybox ``stat``/``find``/``mv``...)."""

    async def stat(self, request: fs_pb.StatRequest, ctx: RequestContext[Any, Any], /) -> fs_pb.StatResponse:
        return fs_pb.StatResponse(entry=await _stat(_record(), _path_or_error(request.path)))

    async def list_dir(
        self, request: fs_pb.ListDirRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.ListDirResponse:
        record = _record()
        path = _path_or_error(request.path)
        depth = max(1, request.depth)
        q = shlex.quote(path)
        script = (
            f"[ -d {q} ] || {{ stat -c %F -- {q} >/dev/null && echo 'not a directory' >&2; exit 2; }}; "
            f"find {q} -mindepth 1 -maxdepth {depth} -exec stat -c {shlex.quote(_STAT_FMT)} -- {{}} +"
        )
        result = await _shell(record, script)
        if result.exit_code != 0:
            raise _fs_error(result, path)
        entries = [parse_stat_line(line) for line in result.stdout.split("\n") if line.count("|") >= 7]
        return fs_pb.ListDirResponse(entries=entries)

    async def make_dir(
        self, request: fs_pb.MakeDirRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.MakeDirResponse:
        record = _record()
        path = _path_or_error(request.path)
        q = shlex.quote(path)
        script = f"if [ -e {q} ]; then echo 'File exists' >&2; exit 17; fi; mkdir -p -- {q}"
        result = await _shell(record, script)
        if result.exit_code != 0:
            raise _fs_error(result, path)
        return fs_pb.MakeDirResponse(entry=await _stat(record, path))

    async def move(self, request: fs_pb.MoveRequest, ctx: RequestContext[Any, Any], /) -> fs_pb.MoveResponse:
        record = _record()
        src, dst = _path_or_error(request.source), _path_or_error(request.destination)
        result = await _shell(record, f"mv -- {shlex.quote(src)} {shlex.quote(dst)}")
        if result.exit_code != 0:
            raise _fs_error(result, src)
        return fs_pb.MoveResponse(entry=await _stat(record, dst))

    async def remove(
        self, request: fs_pb.RemoveRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.RemoveResponse:
        record = _record()
        path = _path_or_error(request.path)
        q = shlex.quote(path)
        result = await _shell(record, f"stat -c %F -- {q} >/dev/null && rm -rf -- {q}")
        if result.exit_code != 0:
            raise _fs_error(result, path)
        return fs_pb.RemoveResponse()

    async def watch_dir(self, request: Any, ctx: RequestContext[Any, Any], /) -> AsyncIterator[Any]:
        raise ConnectError(Code.UNIMPLEMENTED, "WatchDir is not implemented by sbx serve")
        yield  # pragma: no cover - makes this an async generator

    async def create_watcher(self, request: Any, ctx: RequestContext[Any, Any], /) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, "watchers are not implemented by sbx serve")

    async def get_watcher_events(self, request: Any, ctx: RequestContext[Any, Any], /) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, "watchers are not implemented by sbx serve")

    async def remove_watcher(self, request: Any, ctx: RequestContext[Any, Any], /) -> Any:
        raise ConnectError(Code.UNIMPLEMENTED, "watchers are not implemented by sbx serve")


def connect_apps() -> dict[str, Any]:
    """Path prefix -> the connectrpc ASGI app serving it."""
    return {
        "/process.Process/": ProcessASGIApplication(ProcessService()),  # type: ignore[arg-type]
        "/filesystem.Filesystem/": FilesystemASGIApplication(FilesystemService()),  # type: ignore[arg-type]
    }
