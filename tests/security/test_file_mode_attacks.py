"""Reading a live sandbox's memory and disks as another local user.

A real session runs (a VM cold-booted with its RAM in a file on tmpfs, a qcow2 overlay from the
storage daemon, an L1 snapshot saved to the cache). The test then walks every file the VMM and the
qemu-storage-daemon have open (``/proc/<pid>/fd``) and everything under the runtime directory, the
guest-RAM directory and the snapshot cache, checks the modes (files 0600 or stricter, directories
0700) and tries to read each one as the other user: every attempt must end in PermissionError.

Left readable on purpose: the read-only base image bundles (kernel, rootfs) in the image cache.
They hold no user data (built from Debian packages), and are never written by a sandbox.

The directories above ours are made world-traversable (0755), as a user's ``~/.cache`` usually is,
so only the library's own modes stand between the other user and the files.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.sandbox.scheduler import Scheduler
from tests.security.conftest import Attacker

pytestmark = pytest.mark.integration


@pytest.fixture
def open_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="sbxsecm-", dir="/tmp"))
    base.chmod(0o755)
    (base / "cache").mkdir(mode=0o755)
    (base / "cache").chmod(0o755)
    monkeypatch.setenv("SMARTVM_RUNTIME_DIR", str(base / "rt" / "qemu"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _open_files(pid: int) -> set[Path]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        target = target.removesuffix(" (deleted)")
        if target.startswith("/") and not target.startswith(
            ("/dev/null", "/dev/urandom", "/dev/random", "/proc/")
        ):
            found.add(Path(target))
    return found


def _walk(root: Path) -> set[Path]:
    found = {root}
    for directory, dirs, files in os.walk(root):
        found.update(Path(directory, name) for name in dirs + files)
    return found


async def test_nothing_of_a_live_session_is_readable_by_another_user(
    attacker: Attacker, open_base: Path
) -> None:
    config = SchedulerConfig(enable_memory_snapshots=True)
    snapshots = open_base / "cache" / "snapshots"
    async with Scheduler(config, snapshot_dir=snapshots) as scheduler:
        session = await scheduler.session()
        try:
            await session.exec("secret = 'hunter2'")
            assert scheduler._snapshots is not None
            await scheduler._snapshots.wait_saved()
            machine = session.vm.machine
            assert machine.pid is not None and scheduler._pool is not None
            daemon_pid = scheduler._pool._daemon.pid if scheduler._pool._daemon is not None else None
            assert daemon_pid is not None, "the storage daemon is not running"
            paths = _open_files(machine.pid) | _open_files(daemon_pid)
            assert machine.spec is not None and machine.spec.memory_backend is not None  # RAM in a file
            ram = machine.spec.memory_backend.path
            assert ram in paths or ram.exists()
            paths |= {ram, ram.parent}
            paths |= _walk(open_base / "rt") | _walk(snapshots)
            images = scheduler.settings.cache_dir / "images"
            checked = sorted(p for p in paths if not p.is_relative_to(images))
            assert any(p.suffix == ".qcow2" for p in checked) and any(p.name == "memory" for p in checked)

            loose = []
            for path in checked:
                st = os.lstat(path)
                if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.geteuid():
                    loose.append(f"{path} {oct(stat.S_IMODE(st.st_mode))} uid {st.st_uid}")
            readable = {p: how for p, how in attacker.probe(checked).items() if how != "denied"}
            assert not loose and not readable, {"modes": loose, "read as the other user": readable}
        finally:
            await session.close()
