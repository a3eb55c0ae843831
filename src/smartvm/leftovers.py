"""The ONE leftovers convention of the project: owner records, and the reaper that trusts only proof.

Anything the library leaves on the host while it runs (a VM directory with sockets, a storage
daemon's directory, an overlay file, a Scheduler's directory, an overlay pool, a snapshot being
written) carries an :class:`OwnerRecord`:

* a directory holds it as ``<dir>/owner.json`` (:func:`write_owner_record`); the record covers
  the directory and everything in it;
* a file ``<name>`` holds it beside it as ``<name>.owner.json`` (:func:`write_sidecar_record`).

A record names the owner process (pid + start time in clock ticks since boot) and, where a VMM was
started for it, the VMM (pid + start time), a ``marker`` (a path inside the covered directory that
is on the VMM's command line, e.g. its QMP socket) and ``extra_files`` (absolute paths of files
outside the directory, e.g. the guest-RAM file in ``/dev/shm/smartvm-<uid>/``).

:func:`reap` (and :func:`reap_leftovers`, called at every QEMU start) removes what a dead owner
left, and only that:

* the directory it scans must pass :func:`smartvm.hostfs.open_private_dir` (ours, 0700, no
  symlink); everything below is walked with ``dir_fd`` and ``O_NOFOLLOW``; records are read only
  from regular files owned by us;
* an owner is alive while a process with that pid *and start time* exists: its things are kept;
* a VMM is SIGKILLed only after proving it is one we started (through a pidfd, so the pid cannot
  be reused between the proof and the signal): same start time, ``/proc/<pid>/exe`` is
  ``qemu-system-*`` or ``qemu-storage-daemon``, same uid as ours, and the record's marker - which
  must lie inside the covered directory - is on its command line;
* an extra file is removed only when its directory is the scanned directory or a verified private
  shared-memory directory of ours (``/dev/shm/smartvm-<euid>[-*]``), by basename with ``dir_fd``:
  a record naming ``/etc/passwd`` removes nothing;
* a directory without a record is removed only where the caller allows it (``remove_unrecorded``)
  and once it is older than ``min_age`` (it may be being created right now).

Runtime directories: :func:`default_runtime_dir` is the pure choice of path;
:func:`private_runtime_dir` creates and verifies it (see its docstring for the fallback when
someone else holds the default path), :func:`private_shm_dir` does the same for guest RAM files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from smartvm.hostfs import (
    UnsafePathError,
    atomic_write_file,
    ensure_private_dir,
    open_private_dir,
    open_trusted_dir,
    remove_at,
    verify_private_dir,
)

__all__ = [
    "OWNER_FILE",
    "SIDECAR_SUFFIX",
    "OwnerRecord",
    "ReapReport",
    "default_runtime_dir",
    "make_owned_dir",
    "new_owner_record",
    "owner_alive",
    "private_runtime_dir",
    "private_shm_dir",
    "process_start_ticks",
    "read_owner_record",
    "reap",
    "reap_leftovers",
    "remove_owned_dir",
    "remove_sidecar_record",
    "sidecar_name",
    "trash_owned_dir",
    "write_owner_record",
    "write_sidecar_record",
]

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
SIDECAR_SUFFIX = ".owner.json"
SHM_ROOT = Path("/dev/shm")
_MAX_RECORD_BYTES = 64 * 1024
_VMM_EXE = re.compile(r"qemu-system-[A-Za-z0-9_]+|qemu-storage-daemon")
_KILL_WAIT_S = 5.0


# --------------------------------------------------------------------------- /proc


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields resume after the last ')'.
    return int(raw.rsplit(")", 1)[1].split()[19])


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return raw.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\x00") if part]


def _uids(pid: int) -> tuple[int, ...]:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return tuple(int(v) for v in line.split()[1:])
    return ()


def _exe_name(pid: int) -> str:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""
    return os.path.basename(exe.removesuffix(" (deleted)"))


# --------------------------------------------------------------------------- records


@dataclass
class OwnerRecord:
    """Who owns a leftover and which VMM (if any) was started for it; see the module docstring."""

    vm_id: str  # the name of what is covered (VM id, daemon dir, scheduler dir, ...)
    owner_pid: int
    owner_start: int | None
    qemu_pid: int | None = None  # the VMM (qemu-system-* or qemu-storage-daemon), if any
    qemu_start: int | None = None
    marker: str = ""  # a path inside the covered directory that is on the VMM's command line
    extra_files: list[str] = field(default_factory=list)
    kind: str = "vm"
    uid: int = field(default_factory=os.geteuid)


def new_owner_record(name: str, *, kind: str, extra_files: list[str] | None = None) -> OwnerRecord:
    """A record owned by this process (pid + start time)."""
    pid = os.getpid()
    return OwnerRecord(
        vm_id=name,
        owner_pid=pid,
        owner_start=process_start_ticks(pid),
        kind=kind,
        extra_files=extra_files or [],
    )


def _encode(record: OwnerRecord) -> bytes:
    return json.dumps(asdict(record)).encode()


def write_owner_record(directory: Path, record: OwnerRecord) -> None:
    """Write (atomically, 0600) the record covering ``directory``."""
    atomic_write_file(directory / OWNER_FILE, _encode(record))


def sidecar_name(name: str) -> str:
    return f"{name}{SIDECAR_SUFFIX}"


def write_sidecar_record(path: Path, record: OwnerRecord) -> None:
    """Write the record covering the file ``path`` (as ``<path>.owner.json``)."""
    atomic_write_file(path.with_name(sidecar_name(path.name)), _encode(record))


def remove_sidecar_record(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path.with_name(sidecar_name(path.name)))


_TYPES: dict[str, tuple[type, ...]] = {
    "vm_id": (str,),
    "owner_pid": (int,),
    "owner_start": (int, type(None)),
    "qemu_pid": (int, type(None)),
    "qemu_start": (int, type(None)),
    "marker": (str,),
    "extra_files": (list,),
    "kind": (str,),
    "uid": (int,),
}


def _decode(raw: bytes) -> OwnerRecord | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or not {"vm_id", "owner_pid", "owner_start"} <= data.keys():
        return None
    known = {f.name for f in fields(OwnerRecord)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            return None
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
            return None
        values[key] = value
    if not all(isinstance(p, str) for p in values.get("extra_files", [])):
        return None
    return OwnerRecord(**values)


def _read_record_at(dir_fd: int, name: str) -> OwnerRecord | None:
    """The record in file ``name`` of ``dir_fd``: a regular file of ours, not a symlink, small."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None
        raw = fh.read(_MAX_RECORD_BYTES + 1)
    if len(raw) > _MAX_RECORD_BYTES:
        return None
    record = _decode(raw)
    if record is not None and record.uid != os.geteuid():
        return None
    return record


def read_owner_record(directory: Path) -> OwnerRecord | None:
    """The record covering ``directory`` (None if missing, unreadable, forged-looking or invalid)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_record_at(dir_fd, OWNER_FILE)
    finally:
        os.close(dir_fd)


def owner_alive(record: OwnerRecord) -> bool:
    """True while the recorded owner runs (same pid and, when recorded, same start time)."""
    if record.owner_pid <= 0:
        return False
    start = process_start_ticks(record.owner_pid)
    if start is None or _is_zombie_or_gone(record.owner_pid):
        return False
    return record.owner_start is None or start == record.owner_start


def make_owned_dir(parent: Path, prefix: str, *, kind: str) -> Path:
    """A fresh private directory ``parent/<prefix><random>`` (``mkdtemp``: 0700, ours) with our record."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        write_owner_record(path, new_owner_record(path.name, kind=kind))
    except BaseException:
        os.rmdir(path)
        raise
    return path


def remove_owned_dir(path: Path) -> None:
    """Remove a directory this process owns (and made private) without following symlinks."""
    try:
        parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        remove_at(parent_fd, path.name, dir_path=path.parent)
    finally:
        os.close(parent_fd)


def trash_owned_dir(path: Path) -> bool:
    """Rename ``path`` aside (``.trash-<name>-<random>`` beside it), then remove it: its name is free
    at once, however long the removal takes. False when it did not exist."""
    trash = path.with_name(f".trash-{path.name}-{secrets.token_hex(4)}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    remove_owned_dir(trash)
    return True


# --------------------------------------------------------------------------- runtime dirs


def default_runtime_dir() -> Path:
    """``$SMARTVM_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/smartvm/qemu``, else ``/tmp/smartvm-<uid>/qemu``.

    Only the choice of path (pure); :func:`private_runtime_dir` creates and verifies it. Kept short
    on purpose: unix socket paths are limited to 107 bytes.
    """
    explicit = os.environ.get("SMARTVM_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "smartvm" / "qemu"
    return Path(f"/tmp/smartvm-{os.getuid()}") / "qemu"


_fallbacks: dict[tuple[str, str], Path] = {}


def _fallback_dir(kind: str, parent: Path, prefix: str, error: UnsafePathError) -> Path:
    key = (kind, str(parent))
    cached = _fallbacks.get(key)
    if cached is not None and verify_private_dir(cached):
        return cached
    fresh = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    log.warning("%s; using the fresh private directory %s instead", error.message, fresh)
    _fallbacks[key] = fresh
    return fresh


def private_runtime_dir(path: Path | None = None) -> Path:
    """The runtime directory to use, created 0700 and verified (:func:`smartvm.hostfs.ensure_private_dir`).

    ``path`` given: that directory, or :class:`~smartvm.hostfs.UnsafePathError`. Else
    :func:`default_runtime_dir`: ``$SMARTVM_RUNTIME_DIR`` is the caller's explicit choice and must
    verify (else the error); the XDG and ``/tmp`` defaults verify their parent too (Schedulers put
    their dirs there). When someone else holds the default path (another user created
    ``/tmp/smartvm-<uid>`` first, or planted a symlink there), nothing is written into it: this
    process uses a fresh ``mkdtemp`` directory beside it (``/tmp/smartvm-<uid>-XXXXXXXX/qemu``), with
    a warning. Leftovers of a crashed process in such a fallback are not found by the next one.
    """
    if path is not None:
        return ensure_private_dir(path)
    candidate = default_runtime_dir()
    if os.environ.get("SMARTVM_RUNTIME_DIR"):
        return ensure_private_dir(candidate)
    try:
        ensure_private_dir(candidate.parent)
        return ensure_private_dir(candidate)
    except UnsafePathError as exc:
        base = _fallback_dir("runtime", candidate.parent.parent, f"{candidate.parent.name}-", exc)
        return ensure_private_dir(base / candidate.name)


def private_shm_dir(root: Path | None = None) -> Path:
    """``/dev/shm/smartvm-<euid>`` created 0700 and verified, for guest-RAM files (tmpfs).

    If someone else holds that name, a fresh ``mkdtemp`` directory ``smartvm-<euid>-XXXXXXXX``
    beside it, with a warning.
    """
    root = SHM_ROOT if root is None else root
    candidate = root / f"smartvm-{os.geteuid()}"
    try:
        return ensure_private_dir(candidate)
    except UnsafePathError as exc:
        return _fallback_dir("shm", root, f"{candidate.name}-", exc)


def _is_private_shm_dir(path: Path) -> bool:
    name = re.escape(f"smartvm-{os.geteuid()}")
    return (
        path.parent == SHM_ROOT
        and re.fullmatch(rf"{name}(-[A-Za-z0-9_]+)?", path.name) is not None
        and verify_private_dir(path)
    )


# --------------------------------------------------------------------------- the reaper


@dataclass
class ReapReport:
    """What :func:`reap` did: VMM pids killed, entries removed, live owners' entries kept."""

    killed: list[int] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    kept_live: int = 0


def _marker_inside(marker: str, covered: Path) -> bool:
    if not marker or not os.path.isabs(marker):
        return False
    normal = os.path.normpath(marker)
    return normal == str(covered) or normal.startswith(str(covered) + "/")


def _kill_if_our_vmm(record: OwnerRecord, covered: Path) -> int | None:
    """SIGKILL the record's VMM only once proven ours (see the module docstring); its pid or None."""
    pid, start = record.qemu_pid, record.qemu_start
    if pid is None or start is None or pid <= 1 or not _marker_inside(record.marker, covered):
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None  # gone
    try:
        if _is_zombie_or_gone(pid) or process_start_ticks(pid) != start:
            return None  # exited, or the pid now names another process
        if not _VMM_EXE.fullmatch(_exe_name(pid)):
            log.warning("not killing pid %d named by %s: it is not a QEMU binary", pid, covered)
            return None
        uids = _uids(pid)
        if not uids or any(u != os.geteuid() for u in uids[:2]):
            log.warning("not killing pid %d named by %s: it runs as uids %s", pid, covered, uids)
            return None
        if record.marker not in " ".join(_cmdline(pid)):
            log.warning(
                "not killing pid %d named by %s: %s is not on its command line", pid, covered, record.marker
            )
            return None
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + _KILL_WAIT_S
    while not _is_zombie_or_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return pid


def _remove_extra_files(record: OwnerRecord, scanned: Path, covered: Path) -> None:
    for extra in record.extra_files:
        path = Path(os.path.normpath(extra))
        if not path.is_absolute() or path.name in ("", ".", ".."):
            continue
        if path.parent == covered:
            continue  # removed with the directory
        if path.parent != scanned and not _is_private_shm_dir(path.parent):
            log.warning("record %s names %s outside our verified directories: not removed", covered, extra)
            continue
        try:
            fd = open_private_dir(path.parent)
        except (OSError, UnsafePathError) as exc:
            log.warning("not removing %s: %s", extra, exc)
            continue
        try:
            st = os.lstat(path.name, dir_fd=fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(path.name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", extra, exc)
        finally:
            os.close(fd)


def _age(st: os.stat_result) -> float:
    return time.time() - st.st_mtime


def reap(
    directory: Path,
    *,
    min_age: float = 30.0,
    name_pattern: re.Pattern[str] | None = None,
    remove_unrecorded: bool = True,
    depth: int = 3,
    shared_base: bool = False,
) -> ReapReport:
    """Remove what dead owners left in ``directory`` (see the module docstring).

    ``name_pattern``: only entries whose name matches are considered. ``remove_unrecorded``: a
    subdirectory without a record is removed once older than ``min_age`` seconds.
    ``shared_base``: ``directory`` may be a shared sticky directory such as ``/tmp`` (owned by root,
    others cannot touch our entries in it) instead of a private one; then ``remove_unrecorded`` must
    be False. A directory that fails verification is left alone (logged).
    """
    report = ReapReport()
    directory = Path(os.path.abspath(directory))
    if shared_base and remove_unrecorded:
        raise ValueError("a shared base is never cleaned of unrecorded entries")
    try:
        dir_fd = open_trusted_dir(directory) if shared_base else open_private_dir(directory, tighten=False)
    except FileNotFoundError:
        return report
    except UnsafePathError as exc:
        log.warning("not reaping leftovers in %s: %s", directory, exc.message)
        return report
    euid = os.geteuid()
    try:
        for name in sorted(os.listdir(dir_fd)):
            if name_pattern is not None and not name_pattern.fullmatch(name):
                continue
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            if st.st_uid != euid:
                continue
            if stat.S_ISDIR(st.st_mode):
                _reap_dir(
                    directory,
                    dir_fd,
                    name,
                    st,
                    report,
                    min_age=min_age,
                    remove_unrecorded=remove_unrecorded,
                    depth=depth,
                )
            elif (
                stat.S_ISREG(st.st_mode) and name.endswith(SIDECAR_SUFFIX) and len(name) > len(SIDECAR_SUFFIX)
            ):
                _reap_sidecar(directory, dir_fd, name, report)
    finally:
        os.close(dir_fd)
    return report


def _reap_dir(
    directory: Path,
    dir_fd: int,
    name: str,
    st: os.stat_result,
    report: ReapReport,
    *,
    min_age: float,
    remove_unrecorded: bool,
    depth: int,
) -> None:
    covered = directory / name
    try:
        sub_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return
    try:
        record = _read_record_at(sub_fd, OWNER_FILE)
    finally:
        os.close(sub_fd)
    if record is None:
        if remove_unrecorded and _age(st) > min_age and remove_at(dir_fd, name, dir_path=directory):
            report.removed.append(covered)
        return
    if owner_alive(record):
        report.kept_live += 1
        return
    pid = _kill_if_our_vmm(record, covered)
    if pid is not None:
        report.killed.append(pid)
        log.warning(
            "reaped leftover %s pid %d of %s (owner %d is gone)", record.kind, pid, covered, record.owner_pid
        )
    if depth > 0:
        inner = reap(covered, min_age=0.0, depth=depth - 1)
        report.killed += inner.killed
        if inner.kept_live:
            log.warning("%s of dead owner %d holds things of a live owner: kept", covered, record.owner_pid)
            report.kept_live += 1
            return
    _remove_extra_files(record, directory, covered)
    if remove_at(dir_fd, name, dir_path=directory):
        report.removed.append(covered)
        log.info("removed %s %s left by process %d", record.kind, covered, record.owner_pid)


def _reap_sidecar(directory: Path, dir_fd: int, name: str, report: ReapReport) -> None:
    record = _read_record_at(dir_fd, name)
    if record is None:
        return
    if owner_alive(record):
        report.kept_live += 1
        return
    covered_name = name[: -len(SIDECAR_SUFFIX)]
    covered = directory / covered_name
    try:
        st = os.lstat(covered_name, dir_fd=dir_fd)
    except FileNotFoundError:
        st = None
    if st is not None and st.st_uid == os.geteuid() and remove_at(dir_fd, covered_name, dir_path=directory):
        report.removed.append(covered)
        log.info("removed %s %s left by process %d", record.kind, covered, record.owner_pid)
    _remove_extra_files(record, directory, covered)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def reap_leftovers(runtime_dir: Path, *, min_age: float = 30.0) -> list[int]:
    """Reap a runtime directory (see :func:`reap`); returns the VMM pids killed.

    A subdirectory without an owner record is removed only when older than ``min_age`` seconds.
    """
    return reap(runtime_dir, min_age=min_age).killed
