"""QemuMachine against real QEMU under TCG, booting the busybox test guest (see qemu_guest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smartvm.config.models import VMConfigModel
from smartvm.errors import SmartVMError
from smartvm.qemu import (
    DriveSpec,
    MachineState,
    QemuMachine,
    QemuMachineSpec,
    build_argv,
    build_kernel_cmdline,
    reap_leftovers,
)
from smartvm.qemu.process import OwnerRecord, private_shm_dir, process_start_ticks, write_owner_record
from smartvm.qemu.qmp import QmpConnection
from smartvm.vmm.base import SnapshotFiles, VmmBackend, VmmRunState
from tests.integration.qemu_guest import READY_MARKER, guest_initramfs, guest_kernel

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 120.0
COUNT = re.compile(r"^COUNT (\d+)\r?$", re.MULTILINE)


@pytest.fixture(scope="session")
def guest() -> tuple[Path, Path]:
    return guest_kernel(), guest_initramfs()



def make_spec(guest: tuple[Path, Path], mode: str, **update: object) -> QemuMachineSpec:
    kernel, initrd = guest
    cmdline = build_kernel_cmdline(None) + f" smartvm.test={mode}"
    return QemuMachineSpec(kernel=kernel, initrd=initrd, cmdline=cmdline, memory_mib=96, **update)  # type: ignore[arg-type]


@pytest.fixture
async def machines(runtime_dir: Path) -> AsyncIterator[list[QemuMachine]]:
    """Every machine a test makes goes in here and is stopped, whatever happens."""
    made: list[QemuMachine] = []
    yield made
    for machine in reversed(made):
        await machine.stop(timeout=2)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def assert_nothing_left(machine: QemuMachine, pid: int | None) -> None:
    assert pid is not None and gone(pid), f"QEMU pid {pid} still running"
    assert not machine.vm_dir.exists(), list(machine.vm_dir.iterdir())
    assert not list(Path("/dev/shm").glob(f"**/smartvm-{machine.vm_id}*"))


async def wait_count_above(machine: QemuMachine, value: int) -> int:
    """Wait for a COUNT line greater than ``value``; return it."""
    async with asyncio.timeout(BOOT_TIMEOUT):
        while True:
            counts = [int(n) for n in COUNT.findall(machine.console_output())]
            if counts and counts[-1] > value:
                return counts[-1]
            await asyncio.sleep(0.05)


async def test_boot_info_pause_resume_stop(
    guest: tuple[Path, Path], runtime_dir: Path, machines: list[QemuMachine]
) -> None:
    kernel, initrd = guest
    config = VMConfigModel.model_validate(
        {
            "boot_source": {
                "kernel_image_path": str(kernel),
                "initrd_path": str(initrd),
                "boot_args": "console=ttyS0 reboot=k panic=-1 smartvm.test=counter",
            },
            "machine_config": {"vcpu_count": 1, "mem_size_mib": 96},
        }
    )
    machine = QemuMachine(runtime_dir=runtime_dir)
    machines.append(machine)
    assert isinstance(machine, VmmBackend)
    followed: list[str] = []

    async def follow() -> None:  # a caller streaming boot logs from the first line
        async with contextlib.aclosing(machine.console.lines()) as lines:
            async for line in lines:
                followed.append(line)
                if line.startswith("COUNT 2"):
                    return

    follower = asyncio.create_task(follow())
    await machine.start(config)
    pid = machine.pid
    await machine.start(config)  # a second start is a no-op
    assert machine.pid == pid and machine.state is MachineState.RUNNING
    assert machine.spec is not None and "reboot=t" in machine.spec.cmdline
    async with asyncio.timeout(BOOT_TIMEOUT):
        await machine.console.wait_for(READY_MARKER)

    info = await machine.get_info()
    assert info.state is VmmRunState.RUNNING and info.vmm == "qemu" and info.pid == pid
    assert info.accelerator == "tcg" and info.extra["accel_reason"]
    assert info.vmm_version.startswith("7.")
    assert machine.accelerator is not None and machine.accelerator.accel == "tcg"
    async with asyncio.timeout(BOOT_TIMEOUT):
        await follower
    assert any(line.startswith(READY_MARKER) for line in followed) and followed[-1] == "COUNT 2"

    with pytest.raises(SmartVMError) as qmp_err:
        await machine.execute_qmp("no-such-command")
    assert qmp_err.value.code == "QMP_ERROR" and qmp_err.value.details["error_class"] == "CommandNotFound"

    await machine.pause()
    assert await machine.query_status() == "paused"
    assert (await machine.get_info()).state is VmmRunState.PAUSED
    with pytest.raises(SmartVMError) as info_err:
        await machine.load_snapshot(SnapshotFiles(runtime_dir / "s", runtime_dir / "m"))
    assert info_err.value.code == "INVALID_STATE" and "paused" in info_err.value.message

    seen = max([int(n) for n in COUNT.findall(machine.console_output())], default=-1)
    await machine.resume()
    assert await machine.query_status() == "running"
    assert await wait_count_above(machine, seen + 2) > seen + 2  # the guest runs again

    await machine.stop()
    assert machine.state is MachineState.STOPPED and machine.exit_code == 0  # QMP quit was enough
    assert_nothing_left(machine, pid)
    await machine.stop()  # idempotent
    with pytest.raises(SmartVMError) as again:
        await machine.start(config)
    assert again.value.code == "INVALID_STATE"


async def test_owner_qmp_is_inherited_and_the_socket_is_a_second_monitor(
    guest: tuple[Path, Path], runtime_dir: Path, machines: list[QemuMachine]
) -> None:
    machine = QemuMachine(make_spec(guest, "counter"), runtime_dir=runtime_dir)
    machines.append(machine)
    await machine.start()
    assert machine.spec is not None and machine.spec.qmp_fd is not None
    pid = machine.pid
    assert pid is not None
    # QEMU's end of our session is a socket it inherited (QMP needs no listening socket for us).
    assert os.readlink(f"/proc/{pid}/fd/{machine.spec.qmp_fd}").startswith("socket:")
    operator = QmpConnection(machine.qmp_socket, name="operator")
    await operator.connect(timeout=30)
    try:
        status = await operator.execute("query-status")
        assert status["status"] == "running" and status["running"] is True
        assert await machine.query_status() == "running"  # ours, meanwhile
    finally:
        await operator.close()
    await machine.stop()
    assert machine.exit_code == 0  # QMP quit over the inherited socket was enough
    assert_nothing_left(machine, pid)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["ram-file", "ram-streamed"])
async def test_snapshot_restore_continues(
    guest: tuple[Path, Path],
    runtime_dir: Path,
    machines: list[QemuMachine],
    tmp_path: Path,
    shared_memory: bool,
) -> None:
    source = QemuMachine(make_spec(guest, "counter"), runtime_dir=runtime_dir, shared_memory=shared_memory)
    machines.append(source)
    await source.start()
    await wait_count_above(source, 3)
    with pytest.raises(SmartVMError) as not_paused:
        await source.create_snapshot(SnapshotFiles(tmp_path / "x", tmp_path / "y"))
    assert not_paused.value.code == "INVALID_STATE"

    snap_dir = tmp_path / "snap dir with spaces"
    files = SnapshotFiles(snap_dir / "state", snap_dir / "memory")
    await source.save_memory_snapshot(files)
    saved = [int(n) for n in COUNT.findall(source.console_output())][-1]
    assert files.snapshot_path.is_file()
    assert files.mem_file_path.is_file() is shared_memory
    mem_digest = sha256(files.mem_file_path) if shared_memory else None
    source_pid = source.pid
    await source.stop()
    assert_nothing_left(source, source_pid)

    # two clones from the same files: each continues from the saved counter, not from 0
    clones = [QemuMachine(runtime_dir=runtime_dir) for _ in range(2 if shared_memory else 1)]
    machines.extend(clones)
    for clone in clones:
        await clone.load_snapshot(files, resume=True)
    for clone in clones:
        await wait_count_above(clone, saved + 2)
        counts = [int(n) for n in COUNT.findall(clone.console_output())]
        assert saved < counts[0] <= saved + 2, (saved, counts[:5])
        assert READY_MARKER not in clone.console_output()  # it did not boot again
        assert (await clone.get_info()).state is VmmRunState.RUNNING
    if mem_digest is not None:
        assert sha256(files.mem_file_path) == mem_digest  # restores are private copies

    paused_clone = QemuMachine(runtime_dir=runtime_dir)
    machines.append(paused_clone)
    await paused_clone.load_snapshot(files, resume=False)
    assert await paused_clone.query_status() == "paused"
    await paused_clone.resume()
    await wait_count_above(paused_clone, saved)

    for clone in [*clones, paused_clone]:
        pid = clone.pid
        await clone.stop()
        assert_nothing_left(clone, pid)
    assert files.snapshot_path.is_file()  # the snapshot belongs to the caller, not the machine


async def test_bad_snapshots_fail_cleanly(
    guest: tuple[Path, Path], runtime_dir: Path, machines: list[QemuMachine], tmp_path: Path
) -> None:
    source = QemuMachine(make_spec(guest, "idle"), runtime_dir=runtime_dir, shared_memory=True)
    machines.append(source)
    await source.start()
    files = SnapshotFiles(tmp_path / "state", tmp_path / "memory")
    await source.save_memory_snapshot(files)
    await source.stop()

    missing = QemuMachine(runtime_dir=runtime_dir)
    with pytest.raises(SmartVMError) as no_file:
        await missing.load_snapshot(SnapshotFiles(tmp_path / "nope", tmp_path / "memory"))
    assert no_file.value.code == "INVALID_CONFIG" and str(tmp_path / "nope") in no_file.value.message

    # the device state is garbage: QEMU refuses it and exits; we report it and leave nothing
    files.snapshot_path.write_bytes(b"this is not a migration stream" * 100)
    corrupt = QemuMachine(runtime_dir=runtime_dir)
    with pytest.raises(SmartVMError) as bad:
        await corrupt.load_snapshot(files)
    assert bad.value.code == "SNAPSHOT_FAILED" and str(files.snapshot_path) in bad.value.message
    assert bad.value.details["stderr"]
    assert corrupt.state is MachineState.FAILED
    assert_nothing_left(corrupt, corrupt.pid)

    # a snapshot without its sidecar has no machine description
    files.snapshot_path.with_name("state.qemu.json").unlink()
    orphan = QemuMachine(runtime_dir=runtime_dir)
    with pytest.raises(SmartVMError) as no_meta:
        await orphan.load_snapshot(files)
    assert no_meta.value.code == "INVALID_CONFIG" and "state.qemu.json" in no_meta.value.message
    assert os.listdir(runtime_dir) == []


@pytest.mark.parametrize("acpi", [False, True], ids=["acpi-off", "acpi-on"])
async def test_guest_reboot_detected_by_exit_watcher(
    guest: tuple[Path, Path], runtime_dir: Path, machines: list[QemuMachine], acpi: bool
) -> None:
    machine = QemuMachine(make_spec(guest, "reboot", acpi=acpi), runtime_dir=runtime_dir)
    machines.append(machine)
    await machine.start()
    pid = machine.pid
    async with asyncio.timeout(BOOT_TIMEOUT):
        assert await machine.wait() == 0
    await asyncio.sleep(0)  # let the watcher record the exit
    async with asyncio.timeout(10):
        while machine.state is not MachineState.EXITED:
            await asyncio.sleep(0.01)
    assert "REBOOTING" in machine.console_output()
    info = await machine.get_info()
    assert info.state is VmmRunState.NOT_STARTED and info.extra["exit_code"] == 0 and info.pid is None
    with pytest.raises(SmartVMError) as err:
        await machine.pause()
    assert err.value.code == "INVALID_STATE" and "exited" in err.value.message
    await machine.stop()
    assert_nothing_left(machine, pid)


async def test_qemu_killed_from_outside_is_noticed(
    guest: tuple[Path, Path], runtime_dir: Path, machines: list[QemuMachine]
) -> None:
    machine = QemuMachine(make_spec(guest, "idle"), runtime_dir=runtime_dir, shared_memory=True)
    machines.append(machine)
    await machine.start()
    pid = machine.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(30):
        assert await machine.wait() == -signal.SIGKILL
        while machine.state is not MachineState.FAILED:
            await asyncio.sleep(0.01)
    info = await machine.get_info()
    assert info.extra["exit_code"] == -signal.SIGKILL and info.state is VmmRunState.NOT_STARTED
    with pytest.raises(SmartVMError) as err:
        await machine.resume()
    assert err.value.code == "INVALID_STATE" and "failed" in err.value.message
    await machine.stop()
    assert_nothing_left(machine, pid)


async def test_hung_qemu_is_killed(
    guest: tuple[Path, Path], runtime_dir: Path, machines: list[QemuMachine]
) -> None:
    async with QemuMachine(make_spec(guest, "idle"), runtime_dir=runtime_dir, shared_memory=True) as machine:
        machines.append(machine)
        assert machine.state is MachineState.RUNNING  # `async with` started it
        pid = machine.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # QMP quit and SIGTERM both go unanswered
        await machine.stop(timeout=0.5)
        assert machine.exit_code == -signal.SIGKILL
    assert_nothing_left(machine, pid)


async def test_duplicate_vm_id_is_refused(
    guest: tuple[Path, Path], runtime_dir: Path, machines: list[QemuMachine]
) -> None:
    first = QemuMachine(make_spec(guest, "idle"), runtime_dir=runtime_dir, vm_id="twin")
    machines.append(first)
    await first.start()
    second = QemuMachine(make_spec(guest, "idle"), runtime_dir=runtime_dir, vm_id="twin")
    with pytest.raises(SmartVMError) as err:
        await second.start()
    assert err.value.code == "VM_ALREADY_EXISTS" and "twin" in err.value.message
    assert second.pid is None
    assert first.vm_dir.is_dir() and (await first.get_info()).state is VmmRunState.RUNNING  # untouched
    await second.stop()
    assert first.vm_dir.is_dir()
    await first.stop()
    assert not first.vm_dir.exists()


async def test_missing_kernel_is_named(runtime_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-vmlinux"
    machine = QemuMachine(QemuMachineSpec(kernel=missing), runtime_dir=runtime_dir)
    with pytest.raises(SmartVMError) as err:
        await machine.start()
    assert err.value.code == "INVALID_CONFIG" and str(missing) in err.value.message
    assert machine.pid is None and not machine.vm_dir.exists()
    await machine.stop()


async def test_qemu_failing_to_start_reports_stderr(
    guest: tuple[Path, Path], runtime_dir: Path, tmp_path: Path
) -> None:
    not_qcow2 = tmp_path / "disk.img"
    not_qcow2.write_bytes(b"\0" * 65536)
    spec = make_spec(guest, "idle", drives=(DriveSpec(id="d", path=not_qcow2, format="qcow2"),))
    machine = QemuMachine(spec, runtime_dir=runtime_dir, shared_memory=True)
    with pytest.raises(SmartVMError) as err:
        await machine.start()
    assert err.value.code == "VMM_START_FAILED"
    assert "qcow2" in err.value.details["stderr"] and err.value.details["exit_code"] != 0
    assert "qcow2" in err.value.message
    assert machine.state is MachineState.FAILED
    assert_nothing_left(machine, machine.pid)
    await machine.stop()

    no_binary = QemuMachine(spec, runtime_dir=runtime_dir, binary="/nonexistent/qemu-system-x86_64")
    with pytest.raises(SmartVMError) as err2:
        await no_binary.start()
    assert err2.value.code == "VMM_NOT_FOUND" and "/nonexistent/qemu-system-x86_64" in err2.value.message
    assert not no_binary.vm_dir.exists()


async def test_cancel_during_start_leaves_nothing(guest: tuple[Path, Path], runtime_dir: Path) -> None:
    machine = QemuMachine(make_spec(guest, "idle"), runtime_dir=runtime_dir, shared_memory=True)
    task = asyncio.create_task(machine.start())
    async with asyncio.timeout(30):
        while machine.pid is None and not task.done():
            await asyncio.sleep(0)
    pid = machine.pid
    assert pid is not None and not task.done()  # cancelled while QEMU is starting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_nothing_left(machine, pid)
    await machine.stop()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from smartvm.qemu import QemuMachine, QemuMachineSpec

    async def main():
        spec = QemuMachineSpec.model_validate_json(sys.argv[2])
        machine = QemuMachine(spec, runtime_dir=Path(sys.argv[1]), shared_memory=True)
        await machine.start()
        print(machine.pid, machine.vm_id, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def test_owner_killed_takes_qemu_with_it(guest: tuple[Path, Path], runtime_dir: Path) -> None:
    spec = make_spec(guest, "idle")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(runtime_dir), spec.model_dump_json()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        qemu_pid, vm_id = int(line.split()[0]), line.split()[1]
        assert not gone(qemu_pid)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    deadline = time.monotonic() + 60
    while not gone(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(qemu_pid), "QEMU survived its owner"
    # the dead owner's files are reaped on the next start (here: called directly)
    ram = private_shm_dir() / f"smartvm-{vm_id}.ram"  # guest RAM lives in our private dir in /dev/shm
    assert (runtime_dir / vm_id).is_dir() and ram.exists()
    assert reap_leftovers(runtime_dir) == []  # nothing left to kill, only files to delete
    assert not (runtime_dir / vm_id).exists() and not ram.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_reap_leftovers_kills_only_verified_orphans(guest: tuple[Path, Path], runtime_dir: Path) -> None:
    # An orphan QEMU (started without a parent-death signal, as if by an older owner).
    orphan_dir = runtime_dir / "orphan"
    orphan_dir.mkdir()
    qmp = orphan_dir / "qmp.sock"
    argv = build_argv(make_spec(guest, "idle", qmp_socket=qmp, console=False))
    orphan = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Same dead owner, but the recorded pid is some unrelated process: must not be killed.
    impostor_dir = runtime_dir / "impostor"
    impostor_dir.mkdir()
    impostor = subprocess.Popen(["sleep", "600"])
    # A live owner's VM: untouched.
    mine_dir = runtime_dir / "mine"
    mine_dir.mkdir()
    try:
        dead = _dead_pid()
        write_owner_record(
            orphan_dir,
            OwnerRecord("orphan", dead, 1, orphan.pid, process_start_ticks(orphan.pid), str(qmp)),
        )
        write_owner_record(
            impostor_dir,
            OwnerRecord("impostor", dead, 1, impostor.pid, process_start_ticks(impostor.pid), "/x/qmp.sock"),
        )
        write_owner_record(
            mine_dir,
            OwnerRecord("mine", os.getpid(), process_start_ticks(os.getpid()), orphan.pid, None, str(qmp)),
        )
        assert reap_leftovers(runtime_dir) == [orphan.pid]
        assert orphan.wait(timeout=30) == -signal.SIGKILL
        assert impostor.poll() is None
        assert not orphan_dir.exists() and not impostor_dir.exists() and mine_dir.is_dir()
    finally:
        for proc in (orphan, impostor):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
