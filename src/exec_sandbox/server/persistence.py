"""What ``sbx serve`` keeps on disk: paused sandboxes and snapshot templates, surviving a restart.

Layout of the state dir (``ServeConfig.state_dir``; it and every directory in it ``0700``, every file
``0600``, verified before use by :mod:`smartvm.hostfs`)::

    .lock                      flock held by the one server using this state dir
    sandboxes/<sandbox id>/    a paused sandbox
        record.json            SavedSandbox: owner (key sha256), template, metadata, env vars, contexts
        main/                  the shell session's VM snapshot (Session.save: memory, vmstate, disk)
        ctx-<context id>/      one per code-interpreter context that had a VM
    templates/<template id>/   an L1 snapshot of a sandbox made reusable (same layout, record.json
                               is a SavedSandbox too)
    .tmp-<id>-<rand>/          an entry being written (renamed into place when complete)
    .trash-<id>-<rand>/        an entry being deleted

An entry appears only complete: it is written in a ``.tmp-`` dir and renamed to its name once
``record.json`` is in. ``.tmp-`` and ``.trash-`` dirs are what a killed server left: removed when
the next one opens the dir. API keys never reach the disk, only their sha256 (``owner``); access
tokens are not stored (a restarted server hands out new ones on connect).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exec_sandbox.errors import SandboxPermanentError
from exec_sandbox.models import Language
from smartvm.hostfs import UnsafePathError, atomic_write_file, ensure_private_dir, open_private_dir, remove_at

__all__ = [
    "ENTRY_ID_RE",
    "MAIN_SNAPSHOT",
    "EntryKind",
    "SavedContext",
    "SavedSandbox",
    "StateStore",
    "context_snapshot_name",
]

logger = logging.getLogger(__name__)

ENTRY_ID_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{2,63}$")
MAIN_SNAPSHOT: Final = "main"
_RECORD: Final = "record.json"
EntryKind = Literal["sandboxes", "templates"]
_KINDS: Final[tuple[EntryKind, ...]] = ("sandboxes", "templates")
M = TypeVar("M", bound=BaseModel)


def context_snapshot_name(context_id: str) -> str:
    return f"ctx-{context_id}"


class SavedContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[0-9a-f]{4,64}$")
    language: Language
    cwd: str
    prepared: bool = False
    hidden_execs: int = 0
    snapshot: bool = False  # its VM is saved under ctx-<id>/ (a context never used has none)


class SavedSandbox(BaseModel):
    """A paused sandbox or a template: everything but the VMs, which are the snapshot dirs beside it."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    id: str = Field(pattern=ENTRY_ID_RE.pattern)
    owner: str = Field(pattern=r"^[0-9a-f]{64}$")
    template_id: str
    name: str | None = Field(default=None, max_length=200)  # a snapshot template's name, if given
    source: str | None = None  # the sandbox it was saved from
    metadata: dict[str, str] = Field(default_factory=dict)
    env_vars: dict[str, str] = Field(default_factory=dict)
    memory_mb: int
    started_at: float
    end_at: float
    saved_at: float
    contexts: list[SavedContext] = Field(default_factory=list)
    default_contexts: dict[str, str] = Field(default_factory=dict)
    next_pid: int = 1000
    auto_pause: bool = False


class StateStore:
    """The state dir of one server (see the module docstring). ``open()`` before use; ``close()``."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Create/verify the dirs, take the state dir's lock, remove what a killed server left."""
        if self._lock_fd is not None:
            return
        try:
            ensure_private_dir(self.root)
        except UnsafePathError as exc:
            raise SandboxPermanentError(
                f"unusable state dir: {exc.message}", context={"field": "state_dir", "value": str(self.root)}
            ) from exc
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SandboxPermanentError(
                f"another sbx serve uses the state dir {self.root}",
                context={"field": "state_dir", "value": str(self.root)},
            ) from None
        self._lock_fd = fd
        for kind in _KINDS:
            ensure_private_dir(self.root / kind)
            self._sweep(kind)

    def close(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _sweep(self, kind: EntryKind) -> None:
        for name in os.listdir(self.root / kind):
            if name.startswith((".tmp-", ".trash-")):
                logger.info("removing an unfinished state entry %s/%s", kind, name)
                self._remove_name(kind, name)

    def _remove_name(self, kind: EntryKind, name: str) -> None:
        fd = open_private_dir(self.root / kind)
        try:
            remove_at(fd, name, dir_path=self.root / kind)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ entries

    def path(self, kind: EntryKind, entry_id: str) -> Path:
        if not ENTRY_ID_RE.match(entry_id):
            raise ValueError(f"not an entry id: {entry_id!r}")
        return self.root / kind / entry_id

    def staging(self, kind: EntryKind, entry_id: str) -> Path:
        """A fresh private dir to write an entry (or a throwaway snapshot) into."""
        self.path(kind, entry_id)  # validates the id
        tmp = self.root / kind / f".tmp-{entry_id}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        return tmp

    def commit(self, kind: EntryKind, staging: Path, saved: SavedSandbox) -> Path:
        """Write ``record.json`` into ``staging`` and move it into place as entry ``saved.id``."""
        atomic_write_file(staging / _RECORD, saved.model_dump_json(indent=1).encode(), fsync=True)
        target = self.path(kind, saved.id)
        os.rename(staging, target)  # an existing entry of that id makes this fail: ids are fresh
        return target

    def discard(self, path: Path) -> None:
        """Remove a staging dir or an entry (renamed to ``.trash-`` first, so it vanishes at once)."""
        kind = path.parent.name
        if path.parent.parent != self.root or kind not in _KINDS:
            raise ValueError(f"not in the state dir: {path}")
        trash = path.with_name(f".trash-{path.name.removeprefix('.tmp-')}-{secrets.token_hex(4)}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        self._remove_name(kind, trash.name)

    def load(self, kind: EntryKind) -> list[SavedSandbox]:
        """Every complete entry of ``kind``; an unreadable one is logged and removed."""
        found: list[SavedSandbox] = []
        for name in sorted(os.listdir(self.root / kind)):
            if not ENTRY_ID_RE.match(name):
                continue
            entry = self.root / kind / name
            try:
                saved = _read(entry / _RECORD, SavedSandbox)
                if saved.id != name:
                    raise ValueError(f"record of {saved.id!r} under {name!r}")
            except (OSError, ValueError) as exc:
                logger.warning("dropping the unreadable state entry %s: %s", entry, exc)
                self.discard(entry)
                continue
            found.append(saved)
        return found


def _read(path: Path, model: type[M]) -> M:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with contextlib.closing(os.fdopen(fd, "rb")) as f:
        raw = f.read(1024 * 1024)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ValueError(str(exc)) from None
