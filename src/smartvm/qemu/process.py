"""Reaping what a dead owner left behind (spawning itself is :mod:`smartvm.process`).

* QEMU is spawned by :class:`smartvm.process.ChildProcess`: ``PR_SET_PDEATHSIG(SIGKILL)`` and its
  own process group, so it dies with the *thread* that forked it. That signal removes no files
  (sockets, the RAM file in /dev/shm) and is tied to a thread, not the process: hence the records below.
* Each VM has a directory ``<runtime_dir>/<vm_id>/`` holding its sockets and an
  ``owner.json`` (owner pid + start time, QEMU pid + start time, extra files such as the
  RAM file in /dev/shm). :func:`reap_leftovers` kills QEMUs whose owner is gone, after
  checking ``/proc/<pid>`` is still that QEMU (start time and command line), then deletes
  the VM's files. VMs of live owners are never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "OWNER_FILE",
    "OwnerRecord",
    "default_runtime_dir",
    "process_start_ticks",
    "read_owner_record",
    "reap_leftovers",
    "write_owner_record",
]

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"


def default_runtime_dir() -> Path:
    """``$SMARTVM_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/smartvm/qemu``, else ``/tmp/smartvm-<uid>/qemu``.

    Kept short on purpose: unix socket paths are limited to 107 bytes.
    """
    explicit = os.environ.get("SMARTVM_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "smartvm" / "qemu"
    return Path(f"/tmp/smartvm-{os.getuid()}") / "qemu"


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\x00") if part]


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@dataclass
class OwnerRecord:
    """What :func:`reap_leftovers` needs to decide and to clean up."""

    vm_id: str
    owner_pid: int
    owner_start: int | None
    qemu_pid: int | None = None
    qemu_start: int | None = None
    marker: str = ""  # a string that must appear in the QEMU command line (its QMP socket path)
    extra_files: list[str] = field(default_factory=list)


def write_owner_record(vm_dir: Path, record: OwnerRecord) -> None:
    tmp = vm_dir / f".{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, vm_dir / OWNER_FILE)


def read_owner_record(vm_dir: Path) -> OwnerRecord | None:
    try:
        data = json.loads((vm_dir / OWNER_FILE).read_text())
        return OwnerRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def _owner_alive(record: OwnerRecord) -> bool:
    start = process_start_ticks(record.owner_pid)
    if start is None or _is_zombie_or_gone(record.owner_pid):
        return False
    return record.owner_start is None or start == record.owner_start


def _kill_verified(record: OwnerRecord, binary_hint: str = "qemu") -> int | None:
    pid = record.qemu_pid
    if pid is None or _is_zombie_or_gone(pid):
        return None
    if record.qemu_start is not None and process_start_ticks(pid) != record.qemu_start:
        return None  # pid reused by another process
    argv = _cmdline(pid)
    if (
        not argv
        or binary_hint not in Path(argv[0]).name
        or (record.marker and record.marker not in " ".join(argv))
    ):
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while not _is_zombie_or_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return pid


def reap_leftovers(runtime_dir: Path, *, min_age: float = 30.0) -> list[int]:
    """Kill QEMUs left by dead owners under ``runtime_dir`` and delete their files.

    Returns the pids killed. A VM directory without an owner record is removed only when
    older than ``min_age`` seconds (it may belong to a machine being created right now).
    """
    killed: list[int] = []
    if not runtime_dir.is_dir():
        return killed
    for vm_dir in sorted(p for p in runtime_dir.iterdir() if p.is_dir()):
        record = read_owner_record(vm_dir)
        if record is None:
            try:
                age = time.time() - vm_dir.stat().st_mtime
            except OSError:
                continue
            if age > min_age:
                shutil.rmtree(vm_dir, ignore_errors=True)
            continue
        if _owner_alive(record):
            continue
        pid = _kill_verified(record)
        if pid is not None:
            killed.append(pid)
            log.warning(
                "reaped leftover QEMU pid %d of VM %s (owner %d is gone)", pid, record.vm_id, record.owner_pid
            )
        for extra in record.extra_files:
            with contextlib.suppress(OSError):
                Path(extra).unlink()
        shutil.rmtree(vm_dir, ignore_errors=True)
    return killed
