"""A Scheduler killed outright leaves its runtime dir behind; the next Scheduler removes it.

Real processes: a child Python runs a Scheduler with an open session (a cold-booted VM whose RAM
is a /dev/shm file), is SIGKILLed, and its QEMU dies with it (parent-death signal). What nothing
of the dead process can remove (overlays, the VM directory, the RAM file on tmpfs) is removed
when a Scheduler starts next under the same runtime base.
"""

# Blocking local-filesystem checks are fine in tests (ASYNC240).
# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.host.runtime_dirs import reap_dead_scheduler_dirs
from exec_sandbox.sandbox.scheduler import Scheduler
from smartvm.leftovers import OwnerRecord, new_owner_record, write_owner_record
from smartvm.process import pid_alive
from smartvm.qemu.process import read_owner_record

pytestmark = pytest.mark.integration

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from exec_sandbox import Scheduler, SchedulerConfig

    async def main():
        async with Scheduler(SchedulerConfig(), snapshot_dir=Path(sys.argv[1])) as scheduler:
            session = await scheduler.session()
            await session.exec("x = 1")
            print(scheduler.runtime_dir, session.vm.machine.pid, flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


@pytest.fixture
def runtime_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private base (unix socket paths stay under 108 bytes) as SMARTVM_RUNTIME_DIR's parent."""
    base = Path(tempfile.mkdtemp(prefix="sbxreap-", dir="/tmp"))
    monkeypatch.setenv("SMARTVM_RUNTIME_DIR", str(base / "qemu"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def ram_files(runtime_dir: Path) -> list[Path]:
    """The guest-RAM files the dead Scheduler's VMs recorded (smartvm's owner records)."""
    files: list[Path] = []
    for vm_dir in runtime_dir.iterdir():
        record = read_owner_record(vm_dir) if vm_dir.is_dir() else None
        if record is not None:
            files += [Path(p) for p in record.extra_files]
    return files


async def test_a_killed_schedulers_leftovers_are_removed_by_the_next(runtime_base: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(runtime_base / "snapshots"), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(180):
            dead_dir, qemu = (await proc.stdout.readline()).decode().split()
    finally:
        proc.kill()
        await proc.wait()
    dead_dir_path, qemu_pid = Path(dead_dir), int(qemu)
    async with asyncio.timeout(30):  # a deadline, not a speed assertion
        while pid_alive(qemu_pid) and Path(f"/proc/{qemu_pid}/stat").read_text().split()[2] != "Z":
            await asyncio.sleep(0.05)
    # What the dead process could not clean up: this is the leak the next Scheduler must remove.
    rams = ram_files(dead_dir_path)
    assert rams and all(p.exists() for p in rams), rams
    assert any(dead_dir_path.glob("*.qcow2"))
    live_sibling = runtime_base / f"s{os.getpid()}-abcd"  # our pid is alive: not to be touched
    live_sibling.mkdir()
    unrelated = runtime_base / "s1-not-a-scheduler"
    unrelated.mkdir()

    async with Scheduler(SchedulerConfig(enable_memory_snapshots=False)) as scheduler:
        assert scheduler.runtime_dir is not None and scheduler.runtime_dir.parent == runtime_base
        assert not dead_dir_path.exists()
        assert [p for p in rams if p.exists()] == []
        assert live_sibling.is_dir() and unrelated.is_dir()
    assert reap_dead_scheduler_dirs(runtime_base) == []  # nothing dead is left


def test_only_dirs_named_like_a_dead_schedulers_are_reaped(tmp_path: Path) -> None:
    dead_pid = os.fork()
    if dead_pid == 0:
        os._exit(0)
    os.waitpid(dead_pid, 0)
    assert not pid_alive(dead_pid)
    dead = tmp_path / f"s{dead_pid}-0a1b"
    (dead / "vm1").mkdir(parents=True, mode=0o700)
    dead.chmod(0o700)
    (dead / "vm1" / "disk.qcow2").write_bytes(b"x")
    # Scheduler dirs carry an owner record (smartvm.leftovers): pid + start time.
    write_owner_record(dead, OwnerRecord(dead.name, dead_pid, 1, kind="scheduler"))
    alive = tmp_path / f"s{os.getpid()}-0a1b"
    alive.mkdir(mode=0o700)
    write_owner_record(alive, new_owner_record(alive.name, kind="scheduler"))
    odd = [tmp_path / f"s{dead_pid}-0a1b-extra", tmp_path / f"x{dead_pid}-0a1b", tmp_path / "qemu"]
    for path in odd:
        path.mkdir()
    (tmp_path / f"s{dead_pid}-ffff").write_text("a file, not a dir")
    assert reap_dead_scheduler_dirs(tmp_path) == [dead]
    assert not dead.exists() and alive.is_dir() and all(p.is_dir() for p in odd)
    assert (tmp_path / f"s{dead_pid}-ffff").is_file()
    assert reap_dead_scheduler_dirs(tmp_path / "missing") == []
