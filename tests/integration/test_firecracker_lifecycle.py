"""FirecrackerMachine and MicroVM lifecycles, against the fake Firecracker and (when possible) a real one.

The "real" variant needs a ``firecracker`` on PATH, usable KVM (not kvm_pvm) and
``SMARTVM_TEST_KERNEL`` / ``SMARTVM_TEST_ROOTFS``; it is skipped with the reason otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from smartvm.config import VMConfig
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.transport import SocketClient
from smartvm.vmm.base import SnapshotFiles, VmmRunState
from smartvm.vmm.firecracker import FirecrackerState
from tests.fake_firecracker.harness import TARGET_KINDS, Target, machine_for, pid_alive, target_fixture
from tests.support.fc_spec import validate_response

pytestmark = pytest.mark.integration


@pytest.fixture(params=TARGET_KINDS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    yield from target_fixture(request.param)


async def assert_spec_responses(socket_path: Path, expected_state: str) -> None:
    async with SocketClient(socket_path) as client:
        info = await client.get("/")
        validate_response("GET", "/", 200, info)
        assert info["state"] == expected_state
        version = await client.get("/version")
        validate_response("GET", "/version", 200, version)


async def test_machine_full_lifecycle(target: Target) -> None:
    machine = machine_for(target, instance_id="lifecycle-1")
    await machine.start(VMConfig(target.config()))
    try:
        pid = machine.pid
        assert pid is not None and pid_alive(pid)
        assert machine.state is FirecrackerState.RUNNING
        info = await machine.get_info()
        assert (info.id, info.state, info.vmm, info.pid) == (
            "lifecycle-1",
            VmmRunState.RUNNING,
            "firecracker",
            pid,
        )
        await assert_spec_responses(target.socket_path, "Running")

        await machine.pause()
        assert (await machine.get_info()).state is VmmRunState.PAUSED
        files = SnapshotFiles(target.workdir / "vm.snap", target.workdir / "vm.mem")
        await machine.create_snapshot(files)
        assert files.snapshot_path.stat().st_size > 0
        assert files.mem_file_path.stat().st_size > 0
        await machine.resume()
        assert (await machine.get_info()).state is VmmRunState.RUNNING
    finally:
        await machine.stop()
    assert machine.state is FirecrackerState.STOPPED
    assert not pid_alive(pid)
    assert not target.socket_path.exists()
    await machine.stop()  # idempotent


async def test_snapshot_loads_into_a_fresh_process(target: Target) -> None:
    files = SnapshotFiles(target.workdir / "vm.snap", target.workdir / "vm.mem")
    first = machine_for(target)
    await first.start(VMConfig(target.config()))
    try:
        await first.pause()
        await first.create_snapshot(files)
    finally:
        await first.stop()
    assert not target.socket_path.exists()

    second = machine_for(target)
    await second.load_snapshot(files, resume=False)
    try:
        assert second.state is FirecrackerState.PAUSED
        assert (await second.get_info()).state is VmmRunState.PAUSED
        await second.resume()
        assert (await second.get_info()).state is VmmRunState.RUNNING
        await assert_spec_responses(target.socket_path, "Running")
    finally:
        await second.stop()
    assert not target.socket_path.exists()


async def test_snapshot_requires_a_paused_vm(target: Target) -> None:
    machine = machine_for(target)
    await machine.start(VMConfig(target.config()))
    try:
        with pytest.raises(SmartVMError) as info:
            await machine.create_snapshot(SnapshotFiles(target.workdir / "s", target.workdir / "m"))
        assert info.value.code == ErrorCode.INVALID_STATE
        assert "'running'" in info.value.message
        assert not (target.workdir / "s").exists()
    finally:
        await machine.stop()
