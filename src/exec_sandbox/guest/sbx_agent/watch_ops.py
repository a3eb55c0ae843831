"""Directory watches: ``watch_dir {path, recursive}`` -> ``watch_started``, then ``watch_events``
batches until the host cancels it (``cancel`` with the watch's id) or the directory goes away
(``watch_end``). inotify through ctypes (loaded on the first watch, never at boot).

Event types, as envd reports them (fsnotify's): ``create`` (also the new name of a rename),
``write``, ``remove``, ``rename`` (the old name), ``chmod``. Names are relative to the watched
directory (``sub/file`` in a recursive watch).
"""

from __future__ import annotations

import os
import threading

from .core import AgentCore
from .wire import RequestError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .wire import Msg

IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_ISDIR = 0x4000, 0x8000, 0x01000000, 0x40000000
WATCH_MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF \
    | IN_MOVE_SELF | IN_ONLYDIR
KINDS = ((IN_CREATE | IN_MOVED_TO, "create"), (IN_MODIFY, "write"), (IN_DELETE, "remove"),
         (IN_MOVED_FROM, "rename"), (IN_ATTRIB, "chmod"))
MAX_BATCH = 1024  # events per frame
MAX_WATCHED_DIRS = 8192  # directories of one recursive watch (the kernel's per-user default limit)
_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


class WatchOps(AgentCore):
    def op_watch_dir(self, req_id: str, msg: Msg) -> None:
        path = msg.get("path")
        if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
            raise RequestError("invalid_request", "path must be an absolute path")
        path = os.path.normpath(path)
        if not os.path.isdir(path):
            raise RequestError("not_found", f"{path!r} is not a directory")
        recursive = msg.get("recursive") is True
        lib = _lib()
        fd = lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise RequestError("watch_failed", f"inotify_init1: {os.strerror(_errno())}")
        wake_r, wake_w = os.pipe()
        dirs: dict[int, str] = {}  # watch descriptor -> directory relative to path ("" = itself)
        try:
            self._add_watch(fd, path, "", dirs, recursive)
            if not dirs:
                raise RequestError("watch_failed", f"cannot watch {path!r}")
            stop = threading.Event()

            def cancel() -> None:
                stop.set()
                try:
                    os.write(wake_w, b"x")
                except OSError:
                    pass

            self.register(req_id, cancel)
            try:
                self.send({"type": "watch_started", "id": req_id})
                reason = self._watch_loop(req_id, fd, wake_r, path, dirs, recursive, stop)
            finally:
                self.unregister(req_id)
            if reason:
                self.send({"type": "watch_end", "id": req_id, "reason": reason})
        finally:
            for f in (fd, wake_r, wake_w):
                os.close(f)

    def _add_watch(self, fd: int, root: str, rel: str, dirs: dict[int, str], recursive: bool) -> None:
        full = os.path.join(root, rel) if rel else root
        wd = _lib().inotify_add_watch(fd, os.fsencode(full), WATCH_MASK)
        if wd < 0:
            return  # gone meanwhile, or not a directory
        dirs[wd] = rel
        if not recursive:
            return
        try:
            names = [e.name for e in os.scandir(full) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for name in names:
            if len(dirs) >= MAX_WATCHED_DIRS:
                return
            self._add_watch(fd, root, os.path.join(rel, name) if rel else name, dirs, recursive)

    def _watch_loop(self, req_id: str, fd: int, wake_r: int, root: str, dirs: dict[int, str],
                    recursive: bool, stop: threading.Event) -> str | None:
        import select
        import struct

        header = struct.Struct("iIII")
        while not stop.is_set():
            ready, _, _ = select.select([fd, wake_r], [], [])
            if stop.is_set():
                return None
            if fd not in ready:
                continue
            try:
                buf = os.read(fd, 64 * 1024)
            except BlockingIOError:
                continue
            events: list[Msg] = []
            ended = None
            pos = 0
            while pos + header.size <= len(buf):
                wd, mask, _cookie, size = header.unpack_from(buf, pos)
                raw = buf[pos + header.size: pos + header.size + size].rstrip(b"\x00")
                pos += header.size + size
                if mask & IN_Q_OVERFLOW:
                    continue
                base = dirs.get(wd)
                if base is None:
                    continue
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                    if mask & IN_IGNORED:
                        dirs.pop(wd, None)
                    if base == "" and mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                        ended = "the watched directory was removed or moved"
                    continue
                name = os.fsdecode(raw)
                rel = os.path.join(base, name) if base else name
                for bit, kind in KINDS:
                    if mask & bit:
                        events.append({"name": rel, "type": kind})
                if recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) \
                        and len(dirs) < MAX_WATCHED_DIRS:
                    self._add_watch(fd, root, rel, dirs, recursive)
            for start in range(0, len(events), MAX_BATCH):
                self.send({"type": "watch_events", "id": req_id, "events": events[start:start + MAX_BATCH]})
            if ended:
                return ended
        return None
