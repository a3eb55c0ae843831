"""envd's directory watches on the guest agent's inotify watch (:meth:`Session.watch_dir`).

- ``WatchDir`` (the async SDK): a stream of ``start``, then ``filesystem`` events, with a keepalive
  each second of silence; it ends when the client leaves (the guest's watch is cancelled).
- ``CreateWatcher`` / ``GetWatcherEvents`` / ``RemoveWatcher`` (the sync SDK polls): the watch runs
  in a task that keeps the events not yet fetched, at most :data:`MAX_PENDING_EVENTS` (the oldest
  are dropped past that), at most :data:`MAX_WATCHERS` per sandbox; they die with their sandbox.

Event names are relative to the watched directory, as envd's.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Final

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from exec_sandbox.errors import GuestAgentError, SandboxError, SandboxInputError
from exec_sandbox.protocol.process import WatchEvent
from exec_sandbox.server.envd_common import current_record, path_or_error
from exec_sandbox.server.proto.filesystem import filesystem_pb as fs_pb
from exec_sandbox.server.registry import SandboxRecord

__all__ = ["MAX_PENDING_EVENTS", "MAX_WATCHERS", "Watchers", "watch_stream"]

MAX_PENDING_EVENTS: Final = 10_000
MAX_WATCHERS: Final = 16
_KEEPALIVE_S: Final = 1.0
_TYPES: Final = {
    "create": fs_pb.EventType.CREATE,
    "write": fs_pb.EventType.WRITE,
    "remove": fs_pb.EventType.REMOVE,
    "rename": fs_pb.EventType.RENAME,
    "chmod": fs_pb.EventType.CHMOD,
}


def _event(e: WatchEvent) -> fs_pb.FilesystemEvent:
    return fs_pb.FilesystemEvent(name=e.name, type=_TYPES[e.type])


def _response(kind: str, value: object) -> fs_pb.WatchDirResponse:
    return fs_pb.WatchDirResponse(event=Oneof(kind, value))  # type: ignore[arg-type]


def _failure(exc: SandboxError, path: str) -> ConnectError:
    if isinstance(exc, SandboxInputError):
        return ConnectError(Code.INVALID_ARGUMENT, exc.message)
    if isinstance(exc, GuestAgentError) and exc.context.get("code") == "not_found":
        return ConnectError(Code.NOT_FOUND, f"directory {path!r} not found")
    return ConnectError(Code.UNAVAILABLE, f"watching {path!r} failed: {exc.message}")


async def _open(record: SandboxRecord, path: str, recursive: bool) -> AsyncGenerator[list[WatchEvent], None]:
    """The guest watch, once it is in place."""
    watch = record.session.watch_dir(path, recursive=recursive)
    try:
        await anext(watch)
    except SandboxError as exc:
        await watch.aclose()
        raise _failure(exc, path) from None
    return watch


async def watch_stream(request: fs_pb.WatchDirRequest) -> AsyncIterator[fs_pb.WatchDirResponse]:
    record = current_record()
    path = path_or_error(request.path)
    watch = await _open(record, path, request.recursive)
    nxt: asyncio.Future[list[WatchEvent]] | None = None
    try:
        yield _response("start", fs_pb.WatchDirResponse.StartEvent())
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(anext(watch))
            done, _ = await asyncio.wait({nxt}, timeout=_KEEPALIVE_S)
            if not done:
                yield _response("keepalive", fs_pb.WatchDirResponse.KeepAlive())
                continue
            try:
                batch = nxt.result()
            except StopAsyncIteration:
                return
            except SandboxError as exc:
                raise _failure(exc, path) from None
            finally:
                nxt = None
            for e in batch:
                yield _response("filesystem", _event(e))
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt
        await watch.aclose()


@dataclass
class _Watcher:
    sandbox_id: str
    task: asyncio.Task[None]
    events: deque[fs_pb.FilesystemEvent] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_EVENTS))
    error: ConnectError | None = None


class Watchers:
    """The polled watchers of every sandbox, by id."""

    def __init__(self) -> None:
        self._all: dict[str, _Watcher] = {}

    async def create(self, request: fs_pb.CreateWatcherRequest) -> fs_pb.CreateWatcherResponse:
        record = current_record()
        path = path_or_error(request.path)
        self._purge()
        if sum(w.sandbox_id == record.sandbox_id for w in self._all.values()) >= MAX_WATCHERS:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"{MAX_WATCHERS} watchers exist already")
        watch = await _open(record, path, request.recursive)
        watcher_id = secrets.token_hex(8)

        async def follow() -> None:
            try:
                async for batch in watch:
                    watcher.events.extend(_event(e) for e in batch)
            except SandboxError as exc:
                watcher.error = _failure(exc, path)
            finally:
                await watch.aclose()

        task = asyncio.get_running_loop().create_task(follow(), name=f"sbx-serve-watch-{watcher_id}")
        watcher = _Watcher(record.sandbox_id, task)
        self._all[watcher_id] = watcher
        return fs_pb.CreateWatcherResponse(watcher_id=watcher_id)

    def _get(self, watcher_id: str) -> _Watcher:
        watcher = self._all.get(watcher_id)
        if watcher is None or watcher.sandbox_id != current_record().sandbox_id:
            raise ConnectError(Code.NOT_FOUND, f"watcher {watcher_id!r} not found")
        return watcher

    async def events(self, request: fs_pb.GetWatcherEventsRequest) -> fs_pb.GetWatcherEventsResponse:
        watcher = self._get(request.watcher_id)
        events = list(watcher.events)
        watcher.events.clear()
        if not events and watcher.error is not None:
            self._all.pop(request.watcher_id, None)
            raise watcher.error
        return fs_pb.GetWatcherEventsResponse(events=events)

    async def remove(self, request: fs_pb.RemoveWatcherRequest) -> fs_pb.RemoveWatcherResponse:
        watcher = self._get(request.watcher_id)
        self._all.pop(request.watcher_id, None)
        watcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher.task
        return fs_pb.RemoveWatcherResponse()

    def _purge(self) -> None:
        """Forget watchers whose watch ended with nothing left to fetch (a killed sandbox)."""
        for watcher_id, w in list(self._all.items()):
            if w.task.done() and not w.events:
                del self._all[watcher_id]
