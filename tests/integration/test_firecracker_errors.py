"""Failure paths of FirecrackerMachine against the fake: each gives a typed error and leaves nothing behind.

"Nothing behind" is checked from the outside: the fake writes its pid to a file
(checked with ``kill(pid, 0)`` and /proc), and the API socket path must be gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartvm.config import VMConfig
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.microvm import MicroVM, MicroVMState
from smartvm.network import NetworkManager
from smartvm.vmm.base import SnapshotFiles
from smartvm.vmm.firecracker import FirecrackerMachine, FirecrackerState
from tests.fake_firecracker.harness import (
    Target,
    make_fake_binary,
    make_target,
    pid_alive,
    read_pid,
    short_tmp_dir,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake() -> Iterator[Target]:
    with short_tmp_dir() as workdir:
        yield make_target("fake", workdir)


def knobbed(target: Target, *args: str, env: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A fake binary with test knobs, plus the file it will write its pid to."""
    pid_file = target.workdir / "fake.pid"
    knobs = target.workdir / "knobs"
    knobs.mkdir(exist_ok=True)
    return make_fake_binary(knobs, "--pid-file", str(pid_file), *args, env=env), pid_file


async def wait_until(predicate: object, what: str, limit: float = 60.0) -> None:
    """Poll until ``predicate()`` holds; the limit only turns a hang into a clear failure."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        assert loop.time() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


def assert_nothing_left(target: Target, pid_file: Path) -> None:
    assert pid_file.exists(), "the fake never ran"
    assert not pid_alive(read_pid(pid_file))
    assert not target.socket_path.exists()


async def test_vmm_that_exits_before_its_socket_appears(fake: Target) -> None:
    binary, pid_file = knobbed(fake, "--exit-code", "3")
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0)
    with pytest.raises(SmartVMError) as info:
        await machine.start(VMConfig(fake.config()))
    assert info.value.code == ErrorCode.VMM_EXITED
    assert info.value.details["exit_code"] == 3
    assert "injected failure" in info.value.details["stderr"]
    assert machine.state is FirecrackerState.FAILED
    assert_nothing_left(fake, pid_file)


async def test_socket_that_appears_too_late_times_out(fake: Target) -> None:
    binary, pid_file = knobbed(fake, "--delay-socket", "600")
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=1.0)
    with pytest.raises(SmartVMError) as info:
        await machine.start(VMConfig(fake.config()))
    assert info.value.code == ErrorCode.SOCKET_TIMEOUT
    assert str(fake.socket_path) in info.value.message
    assert "stderr" in info.value.details
    assert_nothing_left(fake, pid_file)


async def test_api_400_names_the_step_and_carries_fault_message(fake: Target) -> None:
    binary, pid_file = knobbed(fake)
    config = fake.config(boot_source={"kernel_image_path": str(fake.workdir / "no-such-vmlinux")})
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0)
    with pytest.raises(SmartVMError) as info:
        await machine.start(VMConfig(config))
    err = info.value
    assert (err.code, err.status_code) == (ErrorCode.API_ERROR, 400)
    assert err.details["step"] == "boot_source"
    assert "'boot_source'" in err.message
    assert err.fault_message is not None and "no-such-vmlinux" in err.fault_message
    assert_nothing_left(fake, pid_file)


async def test_vmm_exiting_mid_configuration(fake: Target) -> None:
    # Answers two requests (machine_config, boot_source), then dies before the drive step.
    binary, pid_file = knobbed(fake, "--exit-after-requests", "2", "--exit-code", "7")
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0)
    with pytest.raises(SmartVMError) as info:
        await machine.start(VMConfig(fake.config()))
    assert info.value.code == ErrorCode.API_CONNECTION_FAILED
    assert info.value.details["step"] == "drive:rootfs"
    assert info.value.details["exit_code"] == 7
    assert_nothing_left(fake, pid_file)


async def test_cancellation_during_start_leaves_nothing(fake: Target) -> None:
    binary, pid_file = knobbed(fake, "--request-delay", "600")
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0)
    task = asyncio.create_task(machine.start(VMConfig(fake.config())))
    # Cancel while the first configuration request is in flight.
    await wait_until(fake.socket_path.exists, "the fake's API socket")
    await asyncio.sleep(0.1)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert machine.state is FirecrackerState.FAILED
    assert_nothing_left(fake, pid_file)


async def test_microvm_cancelled_during_start_is_in_error_state(fake: Target) -> None:
    binary, pid_file = knobbed(fake, "--request-delay", "600")
    vm = MicroVM(
        "cancel-vm",
        fake.config(),
        binary,
        fake.socket_path,
        NetworkManager(),
        backend=FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0),
    )
    task = asyncio.create_task(vm.start())
    await wait_until(fake.socket_path.exists, "the fake's API socket")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert vm.state is MicroVMState.ERROR
    assert isinstance(vm.last_error, asyncio.CancelledError)
    assert_nothing_left(fake, pid_file)
    await vm.stop()
    assert vm.state is MicroVMState.STOPPED


async def test_api_timeout_during_configuration(fake: Target) -> None:
    binary, pid_file = knobbed(fake, "--request-delay", "600")
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0, api_timeout=0.5)
    with pytest.raises(SmartVMError) as info:
        await machine.start(VMConfig(fake.config()))
    assert info.value.code == ErrorCode.API_TIMEOUT
    assert info.value.details["step"] == "machine_config"
    assert_nothing_left(fake, pid_file)


async def test_missing_binary(fake: Target) -> None:
    machine = FirecrackerMachine(fake.workdir / "no-firecracker", fake.socket_path)
    with pytest.raises(SmartVMError) as info:
        await machine.start(VMConfig(fake.config()))
    assert info.value.code == ErrorCode.VMM_NOT_FOUND
    assert "no-firecracker" in info.value.message
    assert not fake.socket_path.exists()


async def test_existing_socket_is_refused_and_left_alone(fake: Target) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(fake.socket_path))
    machine = FirecrackerMachine(fake.binary, fake.socket_path)
    with pytest.raises(SmartVMError) as info:
        await machine.start(VMConfig(fake.config()))
    assert info.value.code == ErrorCode.VMM_START_FAILED
    assert "already exists" in info.value.message
    assert fake.socket_path.exists()  # not ours: not removed


async def test_socket_directory_must_exist(fake: Target) -> None:
    machine = FirecrackerMachine(fake.binary, fake.workdir / "missing" / "api.sock")
    with pytest.raises(SmartVMError) as info:
        await machine.start(VMConfig(fake.config()))
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert "missing" in info.value.message


async def test_old_firecracker_logs_a_warning(fake: Target, caplog: pytest.LogCaptureFixture) -> None:
    binary, _ = knobbed(fake, env={"FAKE_FIRECRACKER_VERSION": "1.10.0"})
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0)
    with caplog.at_level(logging.WARNING, logger="smartvm.vmm.firecracker"):
        await machine.start(VMConfig(fake.config()))
    try:
        assert machine.version == (1, 10, 0)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("1.10.0" in w and "older than 1.16.1" in w for w in warnings)
    finally:
        await machine.stop()


async def test_current_firecracker_logs_no_warning(fake: Target, caplog: pytest.LogCaptureFixture) -> None:
    machine = FirecrackerMachine(fake.binary, fake.socket_path, socket_timeout=30.0)
    with caplog.at_level(logging.WARNING, logger="smartvm.vmm.firecracker"):
        await machine.start(VMConfig(fake.config()))
    try:
        assert machine.version == (1, 16, 1)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        await machine.stop()


async def test_stop_ladder_graceful_exit_on_ctrl_alt_del(fake: Target) -> None:
    machine = FirecrackerMachine(fake.binary, fake.socket_path, socket_timeout=30.0)
    await machine.start(VMConfig(fake.config()))
    await machine.stop()
    assert await machine.wait() == 0  # the fake exits 0 on SendCtrlAltDel, 143 on SIGTERM


async def test_stop_ladder_sigterm_for_a_paused_vm(fake: Target) -> None:
    machine = FirecrackerMachine(fake.binary, fake.socket_path, socket_timeout=30.0)
    await machine.start(VMConfig(fake.config()))
    await machine.pause()
    await machine.stop()
    assert await machine.wait() == 143


async def test_stop_ladder_escalates_to_sigkill(fake: Target) -> None:
    binary, pid_file = knobbed(fake, "--ignore-sigterm")
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0)
    await machine.start(VMConfig(fake.config()))
    await machine.pause()
    await machine.stop(timeout=0.5)
    assert await machine.wait() == -signal.SIGKILL
    assert_nothing_left(fake, pid_file)


async def test_vmm_exit_while_running_is_reported(fake: Target) -> None:
    binary, pid_file = knobbed(fake)
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0)
    await machine.start(VMConfig(fake.config()))
    os.kill(read_pid(pid_file), signal.SIGKILL)
    assert await machine.wait() == -signal.SIGKILL
    with pytest.raises(SmartVMError) as info:
        await machine.get_info()
    assert info.value.code == ErrorCode.VMM_EXITED
    await machine.stop()
    assert not fake.socket_path.exists()


async def test_log_and_metrics_fifos_are_created_and_removed(fake: Target) -> None:
    log_path, metrics_path = fake.workdir / "fc.log", fake.workdir / "fc.metrics"
    config = fake.config(
        logger={"log_path": str(log_path), "level": "Info"}, metrics={"metrics_path": str(metrics_path)}
    )
    machine = FirecrackerMachine(fake.binary, fake.socket_path, socket_timeout=30.0)
    await machine.start(VMConfig(config))
    try:
        assert stat.S_ISFIFO(log_path.stat().st_mode)
        assert stat.S_ISFIFO(metrics_path.stat().st_mode)
    finally:
        await machine.stop()
    assert not log_path.exists() and not metrics_path.exists()


async def test_caller_log_file_is_kept(fake: Target) -> None:
    log_path = fake.workdir / "mine.log"
    log_path.write_text("")
    machine = FirecrackerMachine(fake.binary, fake.socket_path, socket_timeout=30.0)
    await machine.start(VMConfig(fake.config(logger={"log_path": str(log_path)})))
    await machine.stop()
    assert log_path.is_file()


async def test_fifos_are_removed_when_start_fails(fake: Target) -> None:
    log_path = fake.workdir / "fc.log"
    binary, pid_file = knobbed(fake, "--exit-code", "1")
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0)
    with pytest.raises(SmartVMError):
        await machine.start(VMConfig(fake.config(logger={"log_path": str(log_path)})))
    assert not log_path.exists()
    assert_nothing_left(fake, pid_file)


async def test_vmm_dies_with_its_owner(fake: Target) -> None:
    """PR_SET_PDEATHSIG: SIGKILL the owning Python process and its Firecracker goes too."""
    binary, pid_file = knobbed(fake)
    owner_script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from smartvm.config import VMConfig
        from smartvm.vmm.firecracker import FirecrackerMachine
        from tests.fake_firecracker.harness import Target

        async def main():
            target = Target("fake", Path({str(binary)!r}), Path({str(fake.workdir)!r}),
                            Path({str(fake.kernel)!r}), Path({str(fake.rootfs)!r}))
            machine = FirecrackerMachine(target.binary, target.socket_path, socket_timeout=60)
            await machine.start(VMConfig(target.config()))
            print("started", flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
        """
    )
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", owner_script, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert owner.stdout is not None
        line = await owner.stdout.readline()
        assert line.strip() == b"started"
        vmm_pid = read_pid(pid_file)
        assert pid_alive(vmm_pid)
        owner.kill()
        await owner.wait()
        await wait_until(lambda: not pid_alive(vmm_pid), "the orphaned VMM to die")
    finally:
        if owner.returncode is None:
            owner.kill()
        await owner.wait()


async def test_failed_snapshot_create_keeps_the_vm_and_leaves_no_partial_files(fake: Target) -> None:
    machine = FirecrackerMachine(fake.binary, fake.socket_path, socket_timeout=30.0)
    await machine.start(VMConfig(fake.config()))
    try:
        await machine.pause()
        files = SnapshotFiles(fake.workdir / "d.snap", fake.workdir / "d.mem")
        # Diff snapshots need dirty-page tracking, which this VM did not enable.
        with pytest.raises(SmartVMError) as info:
            await machine.create_snapshot(files, snapshot_type="Diff")
        err = info.value
        assert (err.code, err.status_code) == (ErrorCode.SNAPSHOT_FAILED, 400)
        assert err.fault_message is not None and "track_dirty_pages" in err.fault_message
        assert not files.snapshot_path.exists() and not files.mem_file_path.exists()
        with pytest.raises(SmartVMError) as info:
            await machine.create_snapshot(SnapshotFiles(fake.workdir / "no" / "s", fake.workdir / "m"))
        assert info.value.code == ErrorCode.INVALID_ARGUMENT
        assert machine.state is FirecrackerState.PAUSED
        await machine.create_snapshot(files)
        assert files.snapshot_path.is_file()
    finally:
        await machine.stop()


async def test_loading_a_corrupt_snapshot_cleans_up(fake: Target) -> None:
    binary, pid_file = knobbed(fake)
    files = SnapshotFiles(fake.workdir / "bad.snap", fake.workdir / "bad.mem")
    files.snapshot_path.write_text("not a snapshot")
    files.mem_file_path.write_bytes(b"\0" * 4096)
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0)
    with pytest.raises(SmartVMError) as info:
        await machine.load_snapshot(files)
    assert info.value.code == ErrorCode.SNAPSHOT_FAILED
    assert info.value.status_code == 400
    assert info.value.fault_message is not None and "snapshot" in info.value.fault_message
    assert machine.state is FirecrackerState.FAILED
    assert_nothing_left(fake, pid_file)
    assert files.snapshot_path.exists()  # the caller's input is never removed


async def test_invalid_config_spawns_nothing(fake: Target) -> None:
    binary, pid_file = knobbed(fake)
    machine = FirecrackerMachine(binary, fake.socket_path, socket_timeout=30.0)
    bad = fake.config(
        drives=[{"drive_id": "root-fs", "path_on_host": str(fake.rootfs), "is_root_device": True}]
    )
    with pytest.raises(SmartVMError) as info:
        await machine.start(VMConfig(bad))
    assert info.value.code == ErrorCode.INVALID_CONFIG
    assert "root-fs" in info.value.message
    assert machine.state is FirecrackerState.NEW
    assert not pid_file.exists()
    assert not fake.socket_path.exists()
