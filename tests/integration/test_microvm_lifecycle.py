"""MicroVM lifecycles on the Firecracker backend: the fake Firecracker, and a real one when possible."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.microvm import MicroVM, MicroVMState
from smartvm.network import NetworkManager
from smartvm.vmm.base import VmmRunState
from tests.fake_firecracker.harness import TARGET_KINDS, Target, machine_for, pid_alive, target_fixture

pytestmark = pytest.mark.integration


@pytest.fixture(params=TARGET_KINDS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    yield from target_fixture(request.param)


async def test_microvm_full_lifecycle(target: Target) -> None:
    vm = MicroVM(
        "microvm-lc",
        target.config("microvm-lc"),
        target.binary,
        target.socket_path,
        NetworkManager(),
        backend=machine_for(target, instance_id="microvm-lc"),
    )
    async with vm:
        assert vm.state is MicroVMState.CREATED
        await vm.start()
        await vm.start()  # a running VM: no-op
        assert vm.state is MicroVMState.RUNNING
        pid = vm.pid
        assert pid is not None and pid_alive(pid)
        assert (await vm.get_info()).id == "microvm-lc"

        await vm.pause()
        assert vm.state is MicroVMState.PAUSED
        with pytest.raises(SmartVMError) as info:
            await vm.pause()
        assert info.value.code == ErrorCode.INVALID_STATE
        assert "paused" in info.value.message
        files = await vm.snapshot(target.workdir / "m.snap", target.workdir / "m.mem")
        assert files.snapshot_path.is_file() and files.mem_file_path.is_file()
        await vm.resume()
        assert vm.state is MicroVMState.RUNNING
        with pytest.raises(SmartVMError) as info:
            await vm.snapshot(target.workdir / "x.snap", target.workdir / "x.mem")
        assert info.value.code == ErrorCode.INVALID_STATE
    assert vm.state is MicroVMState.STOPPED
    assert not pid_alive(pid)
    assert not target.socket_path.exists()
    with pytest.raises(SmartVMError) as info:
        await vm.get_info()
    assert info.value.code == ErrorCode.NO_CLIENT
    await vm.stop()


async def test_microvm_restores_from_snapshot(target: Target) -> None:
    snap, mem = target.workdir / "r.snap", target.workdir / "r.mem"
    async with MicroVM(
        "restore-src",
        target.config(),
        target.binary,
        target.socket_path,
        NetworkManager(),
        backend=machine_for(target),
    ) as vm:
        await vm.start()
        await vm.pause()
        await vm.snapshot(snap, mem)

    restored = MicroVM(
        "restore-dst",
        target.config(),
        target.binary,
        target.socket_path,
        NetworkManager(),
        backend=machine_for(target),
    )
    async with restored:
        await restored.load_snapshot(snap, mem, resume=True)
        assert restored.state is MicroVMState.RUNNING
        assert (await restored.get_info()).state is VmmRunState.RUNNING
    assert not target.socket_path.exists()
