"""Pure parts of the Firecracker backend and MicroVM guards that need no process."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.microvm import MicroVM, MicroVMState
from smartvm.network import NetworkManager
from smartvm.vmm.base import NetworkOverride, SnapshotFiles, VmmBackend
from smartvm.vmm.firecracker import (
    FirecrackerMachine,
    FirecrackerState,
    build_firecracker_argv,
    build_snapshot_load_payload,
    parse_firecracker_version,
)
from tests.support.fc_spec import SpecViolation, validate_request

CONFIG = {
    "boot_source": {"kernel_image_path": "/vmlinux"},
    "machine_config": {"vcpu_count": 1, "mem_size_mib": 128},
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Firecracker v1.16.1\n\nSupported snapshot data format versions: v8.0.0\n", (1, 16, 1)),
        ("Firecracker v1.7.0-dev\n", (1, 7, 0)),
        ("firecracker 2.0.10", (2, 0, 10)),
        ("", None),
        ("usage: firecracker [OPTIONS]", None),
    ],
)
def test_parse_firecracker_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_firecracker_version(text) == expected


def test_argv_names_the_socket_and_optional_id() -> None:
    assert build_firecracker_argv("/usr/bin/firecracker", Path("/run/a.sock")) == [
        "/usr/bin/firecracker",
        "--api-sock",
        "/run/a.sock",
    ]
    assert build_firecracker_argv("fc", Path("/s"), "vm-1")[-2:] == ["--id", "vm-1"]


def test_snapshot_load_payload_with_overrides_satisfies_the_spec() -> None:
    payload = build_snapshot_load_payload(
        SnapshotFiles(Path("/snap/state"), Path("/snap/mem")),
        resume=True,
        network_overrides=[NetworkOverride("eth0", "svtap1")],
        vsock_uds_path="/run/v.sock",
    )
    validate_request("PUT", "/snapshot/load", payload)
    assert payload == {
        "snapshot_path": "/snap/state",
        "mem_backend": {"backend_type": "File", "backend_path": "/snap/mem"},
        "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "svtap1"}],
        "vsock_override": {"uds_path": "/run/v.sock"},
    }


def test_minimal_snapshot_load_payload_satisfies_the_spec() -> None:
    payload = build_snapshot_load_payload(SnapshotFiles(Path("/s"), Path("/m")), resume=False)
    validate_request("PUT", "/snapshot/load", payload)
    assert "network_overrides" not in payload and "vsock_override" not in payload


def test_the_spec_check_would_catch_a_wrong_payload() -> None:
    # Guards the test above: the validator really rejects what Firecracker rejects.
    with pytest.raises(SpecViolation):
        validate_request("PUT", "/snapshot/load", {"snapshot_path": "/s", "resume": True})


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"socket_path": "/tmp/" + "s" * 110}, "AF_UNIX"),
        ({"instance_id": "has space"}, "instance_id"),
        ({"instance_id": "x" * 65}, "instance_id"),
        ({"socket_timeout": 0.0}, "timeouts"),
        ({"binary_path": ""}, "binary_path"),
    ],
)
def test_machine_rejects_bad_arguments(kwargs: dict[str, object], needle: str) -> None:
    args: dict[str, object] = {"binary_path": "firecracker", "socket_path": "/tmp/a.sock", **kwargs}
    with pytest.raises(SmartVMError) as info:
        FirecrackerMachine(**args)  # type: ignore[arg-type]
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert needle in info.value.message


async def test_machine_calls_before_start_name_the_state() -> None:
    machine = FirecrackerMachine("/bin/false", "/tmp/never-used.sock")
    assert isinstance(machine, VmmBackend)
    with pytest.raises(SmartVMError) as info:
        await machine.pause()
    assert info.value.code == ErrorCode.INVALID_STATE
    assert "'new'" in info.value.message
    with pytest.raises(SmartVMError) as info:
        await machine.create_snapshot(SnapshotFiles(Path("/tmp/s"), Path("/tmp/m")))
    assert info.value.code == ErrorCode.INVALID_STATE
    with pytest.raises(SmartVMError) as info:
        await machine.get_info()
    assert info.value.code == ErrorCode.NO_CLIENT
    assert await machine.wait() is None
    await machine.stop()
    await machine.stop()
    assert machine.state is FirecrackerState.STOPPED


async def test_load_snapshot_names_a_missing_file_before_spawning(tmp_path: Path) -> None:
    machine = FirecrackerMachine("/bin/false", "/tmp/never-used.sock")
    (tmp_path / "state").write_text("x")
    with pytest.raises(SmartVMError) as info:
        await machine.load_snapshot(SnapshotFiles(tmp_path / "state", tmp_path / "mem"))
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert str(tmp_path / "mem") in info.value.message
    assert machine.state is FirecrackerState.NEW


@pytest.mark.parametrize("vm_id", ["", "bad id", "-leading", "x" * 65, "a/b"])
def test_microvm_rejects_bad_ids(vm_id: str) -> None:
    with pytest.raises(SmartVMError) as info:
        MicroVM(vm_id, CONFIG, "/bin/false", "/tmp/x.sock", NetworkManager())
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


def test_microvm_copies_its_config() -> None:
    config = {**CONFIG, "machine_config": {"vcpu_count": 1, "mem_size_mib": 128}}
    vm = MicroVM("copy-vm", config, "/bin/false", "/tmp/x.sock", NetworkManager())
    config["machine_config"]["vcpu_count"] = 8
    assert vm.config.config.machine_config.vcpu_count == 1
    assert vm.state is MicroVMState.CREATED
    assert vm.id == "copy-vm"


async def test_microvm_wrong_state_calls_name_the_state() -> None:
    vm = MicroVM("state-vm", CONFIG, "/bin/false", "/tmp/x.sock", NetworkManager())
    for call in (vm.pause, vm.resume):
        with pytest.raises(SmartVMError) as info:
            await call()
        assert info.value.code == ErrorCode.INVALID_STATE
        assert "created" in info.value.message
    with pytest.raises(SmartVMError) as info:
        await vm.snapshot("/tmp/s", "/tmp/m")
    assert info.value.code == ErrorCode.INVALID_STATE
    with pytest.raises(SmartVMError) as info:
        await vm.get_info()
    assert info.value.code == ErrorCode.NO_CLIENT


async def test_microvm_invalid_config_is_reported_before_anything_runs() -> None:
    bad = {
        "machine_config": {"vcpu_count": 0, "mem_size_mib": 128},
        "vsock": {"guest_cid": 2, "uds_path": "/v"},
    }
    vm = MicroVM("bad-config-vm", bad, "/nonexistent/firecracker", "/tmp/x.sock", NetworkManager())
    with pytest.raises(SmartVMError) as info:
        await vm.start()
    assert info.value.code == ErrorCode.INVALID_CONFIG
    errors = info.value.details["errors"]
    assert "vsock.guest_cid must be >= 3" in errors
    assert len(errors) >= 3  # boot_source missing, vcpu_count, guest_cid: all reported at once
    # Nothing ran, so nothing changed state.
    assert vm.state is MicroVMState.CREATED


async def test_stop_is_idempotent_and_final_for_a_never_started_vm() -> None:
    vm = MicroVM("stop-vm", CONFIG, "/bin/false", "/tmp/x.sock", NetworkManager())
    async with vm:
        pass
    assert vm.state is MicroVMState.STOPPED
    await vm.stop()
    with pytest.raises(SmartVMError) as info:
        await vm.start()
    assert info.value.code == ErrorCode.INVALID_STATE
    assert "stopped" in info.value.message
