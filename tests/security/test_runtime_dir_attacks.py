"""The runtime directory taken over by another local user before the library runs.

The other user pre-creates the runtime directory (a directory of theirs, or a symlink to one) in a
shared sticky directory, as ``/tmp/smartvm-<uid>`` would be. A real QEMU VM is then started: the
library must refuse with a clear error (an explicit ``$SMARTVM_RUNTIME_DIR``) or use a fresh private
directory (the default path), and never write into theirs. Plus the overlay-pool regression: a live
Scheduler's own directories carry owner records, so a QEMU start's reaper never takes them.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.sandbox.scheduler import Scheduler
from smartvm.errors import SmartVMError
from smartvm.qemu import QemuMachine, QemuMachineSpec, build_kernel_cmdline
from tests.integration.qemu_guest import guest_initramfs, guest_kernel
from tests.security.conftest import Attacker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def idle_spec() -> QemuMachineSpec:
    cmdline = build_kernel_cmdline(None) + " smartvm.test=idle"
    return QemuMachineSpec(kernel=guest_kernel(), initrd=guest_initramfs(), cmdline=cmdline, memory_mib=96)


@pytest.fixture
async def started() -> AsyncIterator[list[QemuMachine]]:
    made: list[QemuMachine] = []
    yield made
    for machine in made:
        await machine.stop(timeout=2)


async def _start_vm(spec: QemuMachineSpec, made: list[QemuMachine]) -> QemuMachine | SmartVMError:
    """Start a VM with the default runtime dir; the machine, or the error the library raised."""
    try:
        machine = QemuMachine(spec, shared_memory=True)
        made.append(machine)
        await machine.start()
    except SmartVMError as exc:
        return exc
    return machine


def _assert_private(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700, (
        path,
        oct(st.st_mode),
        st.st_uid,
    )


async def test_runtime_dir_pre_created_by_another_user_is_refused(
    attacker: Attacker,
    shared_sticky_dir: Path,
    idle_spec: QemuMachineSpec,
    started: list[QemuMachine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    planted = shared_sticky_dir / "rt"
    attacker.run(["mkdir", "-m", "0777", str(planted)])
    monkeypatch.setenv("SMARTVM_RUNTIME_DIR", str(planted))
    outcome = await _start_vm(idle_spec, started)
    assert isinstance(outcome, SmartVMError), f"the VM ran in {outcome.runtime_dir}, a directory of theirs"
    assert outcome.code == "UNSAFE_PATH" and str(planted) in outcome.message, outcome
    assert attacker.tree(planted) == []  # nothing of ours in there


async def test_runtime_dir_symlink_planted_by_another_user_is_refused(
    attacker: Attacker,
    shared_sticky_dir: Path,
    idle_spec: QemuMachineSpec,
    started: list[QemuMachine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    theirs = shared_sticky_dir / "theirs"
    attacker.run(["mkdir", "-m", "0777", str(theirs)])
    attacker.run(["ln", "-s", str(theirs), str(shared_sticky_dir / "rt")])
    monkeypatch.setenv("SMARTVM_RUNTIME_DIR", str(shared_sticky_dir / "rt"))
    outcome = await _start_vm(idle_spec, started)
    assert isinstance(outcome, SmartVMError), f"the VM ran in {outcome.runtime_dir}, through their symlink"
    assert outcome.code == "UNSAFE_PATH" and "symbolic link" in outcome.message, outcome
    assert attacker.tree(theirs) == []


async def test_default_runtime_dir_taken_by_another_user_falls_back_to_a_private_one(
    attacker: Attacker,
    shared_sticky_dir: Path,
    idle_spec: QemuMachineSpec,
    started: list[QemuMachine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The default is $XDG_RUNTIME_DIR/smartvm/qemu: the other user got "smartvm" first.
    monkeypatch.delenv("SMARTVM_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared_sticky_dir))
    theirs = shared_sticky_dir / "smartvm"
    attacker.run(["mkdir", "-m", "0777", str(theirs)])
    outcome = await _start_vm(idle_spec, started)
    assert isinstance(outcome, QemuMachine), f"the VM did not start: {outcome}"
    assert not outcome.runtime_dir.is_relative_to(theirs.resolve()), outcome.runtime_dir
    assert not outcome.runtime_dir.resolve().is_relative_to(theirs.resolve()), outcome.runtime_dir
    _assert_private(outcome.runtime_dir)
    _assert_private(outcome.vm_dir)
    assert attacker.tree(theirs) == []


@pytest.fixture
def runtime_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="sbxsecp-", dir="/tmp"))
    monkeypatch.setenv("SMARTVM_RUNTIME_DIR", str(base / "qemu"))
    try:
        yield base
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


async def test_a_live_schedulers_overlay_pool_dir_survives_a_qemu_start(runtime_base: Path) -> None:
    config = SchedulerConfig(enable_memory_snapshots=False)
    async with Scheduler(config, snapshot_dir=runtime_base / "snapshots") as scheduler:
        assert scheduler._pool is not None
        pool_dir = scheduler._pool.pool_dir
        lock = pool_dir / ".overlay-pool.lock"
        inode = lock.stat().st_ino
        first = await scheduler.run("print(1)")  # the pool now keeps overlays of this base
        assert first.stdout == "1\n", first
        await scheduler._pool.wait_filled()
        old = os.stat(pool_dir).st_mtime - 3600  # the Scheduler has been up for an hour
        os.utime(pool_dir, (old, old))
        result = await scheduler.run("print(6 * 7)")  # a cold boot: QEMU starts, its reaper runs
        assert result.stdout == "42\n", result
        assert lock.exists() and lock.stat().st_ino == inode, "the live pool's directory was reaped"
