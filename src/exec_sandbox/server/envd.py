"""The in-sandbox daemon (E2B's "envd") API, served on the host for each sandbox.

- ``process.Process``: :mod:`exec_sandbox.server.envd_process` (background processes in the guest).
- ``filesystem.Filesystem`` (Connect RPC, via ``connectrpc`` with our own stubs): ``Stat``,
  ``ListDir``, ``MakeDir``, ``Move``, ``Remove`` (through the guest's shell tools), ``WatchDir`` and
  the polled watchers (:mod:`exec_sandbox.server.envd_watch`).
- ``/files`` and ``/health`` are in :mod:`exec_sandbox.server.files`.

Paths: E2B's home ``/home/user`` is mapped onto our guest work dir; relative paths start there. The
sandbox a request is for is set by the app (from ``E2b-Sandbox-Id`` and the access token) in
:data:`CURRENT_SANDBOX` before these handlers run.
"""

from __future__ import annotations

import logging
import posixpath
import shlex
from collections.abc import AsyncIterator
from typing import Any, Final

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from exec_sandbox.errors import SandboxError, SandboxInputError
from exec_sandbox.models import ExecutionResult
from exec_sandbox.server.envd_common import (
    CURRENT_SANDBOX,
    E2B_HOME,
    current_record,
    e2b_path,
    guest_path,
    path_or_error,
)
from exec_sandbox.server.envd_process import ProcessService
from exec_sandbox.server.envd_watch import Watchers, watch_stream
from exec_sandbox.server.proto.filesystem import filesystem_pb as fs_pb
from exec_sandbox.server.proto.filesystem.filesystem_connect import FilesystemASGIApplication
from exec_sandbox.server.proto.process.process_connect import ProcessASGIApplication
from exec_sandbox.server.registry import SandboxRecord

__all__ = [
    "CURRENT_SANDBOX",
    "E2B_HOME",
    "FS_TIMEOUT_S",
    "FilesystemService",
    "ProcessService",
    "e2b_path",
    "guest_path",
    "parse_stat_line",
]

logger = logging.getLogger(__name__)

_STAT_FMT: Final = "%F|%s|%a|%A|%U|%G|%Y|%n"
FS_TIMEOUT_S: Final = 60.0


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
        path=e2b_path(name),
        size=int(size),
        mode=int(mode, 8),
        permissions=perms,
        owner=owner,
        group=group,
        modified_time=Timestamp(seconds=int(mtime)),
        is_symlink=kind == "symbolic link",
    )


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


class FilesystemService:
    """``filesystem.Filesystem`` through the guest's shell tools (busybox ``stat``/``find``/``mv``...)
    and the guest agent's inotify watch."""

    def __init__(self) -> None:
        self._watchers = Watchers()

    async def stat(self, request: fs_pb.StatRequest, ctx: RequestContext[Any, Any], /) -> fs_pb.StatResponse:
        return fs_pb.StatResponse(entry=await _stat(current_record(), path_or_error(request.path)))

    async def list_dir(
        self, request: fs_pb.ListDirRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.ListDirResponse:
        record = current_record()
        path = path_or_error(request.path)
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
        record = current_record()
        path = path_or_error(request.path)
        q = shlex.quote(path)
        script = f"if [ -e {q} ]; then echo 'File exists' >&2; exit 17; fi; mkdir -p -- {q}"
        result = await _shell(record, script)
        if result.exit_code != 0:
            raise _fs_error(result, path)
        return fs_pb.MakeDirResponse(entry=await _stat(record, path))

    async def move(self, request: fs_pb.MoveRequest, ctx: RequestContext[Any, Any], /) -> fs_pb.MoveResponse:
        record = current_record()
        src, dst = path_or_error(request.source), path_or_error(request.destination)
        result = await _shell(record, f"mv -- {shlex.quote(src)} {shlex.quote(dst)}")
        if result.exit_code != 0:
            raise _fs_error(result, src)
        return fs_pb.MoveResponse(entry=await _stat(record, dst))

    async def remove(
        self, request: fs_pb.RemoveRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.RemoveResponse:
        record = current_record()
        path = path_or_error(request.path)
        q = shlex.quote(path)
        result = await _shell(record, f"stat -c %F -- {q} >/dev/null && rm -rf -- {q}")
        if result.exit_code != 0:
            raise _fs_error(result, path)
        return fs_pb.RemoveResponse()

    async def watch_dir(
        self, request: fs_pb.WatchDirRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[fs_pb.WatchDirResponse]:
        async for event in watch_stream(request):
            yield event

    async def create_watcher(
        self, request: fs_pb.CreateWatcherRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.CreateWatcherResponse:
        return await self._watchers.create(request)

    async def get_watcher_events(
        self, request: fs_pb.GetWatcherEventsRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.GetWatcherEventsResponse:
        return await self._watchers.events(request)

    async def remove_watcher(
        self, request: fs_pb.RemoveWatcherRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.RemoveWatcherResponse:
        return await self._watchers.remove(request)


def connect_apps() -> dict[str, Any]:
    """Path prefix -> the connectrpc ASGI app serving it."""
    return {
        "/process.Process/": ProcessASGIApplication(ProcessService()),  # type: ignore[arg-type]
        "/filesystem.Filesystem/": FilesystemASGIApplication(FilesystemService()),  # type: ignore[arg-type]
    }
