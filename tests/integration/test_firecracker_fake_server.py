"""The fake Firecracker enforces the API rules the real one does (so passing tests mean something).

Talks to the fake through SocketClient only; every successful response is also
checked against the spec here, independently of the fake's own check.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.transport import SocketClient
from tests.fake_firecracker.harness import FAKE_BINARY, make_fake_binary, short_tmp_dir
from tests.support.fc_spec import load_spec, match_path, validate_response

pytestmark = pytest.mark.integration


def in_spec(method: str, path: str) -> bool:
    matched = match_path(path)
    return matched is not None and method.lower() in load_spec()["paths"][matched[0]]


class Fake:
    def __init__(self, workdir: Path, client: SocketClient) -> None:
        self.workdir = workdir
        self.client = client
        self.kernel = workdir / "vmlinux"
        self.kernel.write_bytes(b"k")
        self.disk = workdir / "disk.ext4"
        self.disk.write_bytes(b"d")

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        result = await self.client.request(method, path, body)
        validate_response(method, path, 200 if result is not None else 204, result)
        return result

    async def rejected(self, method: str, path: str, body: Any = None) -> SmartVMError:
        with pytest.raises(SmartVMError) as info:
            await self.client.request(method, path, body)
        assert info.value.code == ErrorCode.API_ERROR
        assert info.value.status_code == 400
        if in_spec(method, path):
            validate_response(method, path, 400, {"fault_message": info.value.fault_message})
        assert info.value.fault_message
        return info.value

    async def boot(self) -> None:
        await self.ok("PUT", "/boot-source", {"kernel_image_path": str(self.kernel)})
        await self.ok("PUT", "/actions", {"action_type": "InstanceStart"})

    async def state(self) -> str:
        info = await self.ok("GET", "/")
        return str(info["state"])


async def spawn(workdir: Path, binary: Path = FAKE_BINARY) -> asyncio.subprocess.Process:
    sock = workdir / "api.sock"
    proc = await asyncio.create_subprocess_exec(
        str(binary), "--api-sock", str(sock), "--id", "fake-test", stderr=asyncio.subprocess.DEVNULL
    )
    await SocketClient(sock).wait_for_socket(60.0)
    return proc


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    with short_tmp_dir() as workdir:
        proc = await spawn(workdir)
        try:
            async with SocketClient(workdir / "api.sock") as client:
                yield Fake(workdir, client)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_version_flag() -> None:
    proc = await asyncio.create_subprocess_exec(str(FAKE_BINARY), "--version", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert out.decode().splitlines()[0] == "Firecracker v1.16.1"


async def test_instance_info_follows_the_lifecycle(fake: Fake) -> None:
    info = await fake.ok("GET", "/")
    assert info == {
        "app_name": "Firecracker",
        "id": "fake-test",
        "state": "Not started",
        "vmm_version": "1.16.1",
    }
    assert await fake.ok("GET", "/version") == {"firecracker_version": "1.16.1"}
    await fake.boot()
    assert await fake.state() == "Running"
    await fake.ok("PATCH", "/vm", {"state": "Paused"})
    assert await fake.state() == "Paused"
    await fake.ok("PATCH", "/vm", {"state": "Resumed"})
    assert await fake.state() == "Running"
    config = await fake.ok("GET", "/vm/config")
    assert config["boot-source"] == {"kernel_image_path": str(fake.kernel)}


async def test_unknown_fields_are_rejected(fake: Fake) -> None:
    err = await fake.rejected("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "vcpus": 2})
    assert "vcpus" in (err.fault_message or "")


async def test_wrong_types_and_missing_required_fields_are_rejected(fake: Fake) -> None:
    await fake.rejected("PUT", "/machine-config", {"vcpu_count": "1", "mem_size_mib": 128})
    await fake.rejected("PUT", "/drives/root", {"drive_id": "root"})
    await fake.rejected("PUT", "/actions", {"action_type": "Reboot"})


async def test_unknown_path_is_rejected(fake: Fake) -> None:
    err = await fake.rejected("GET", "/no-such-thing")
    assert "/no-such-thing" in (err.fault_message or "")
    err = await fake.rejected("DELETE", "/drives/rootfs")
    assert "DELETE" in (err.fault_message or "")


@pytest.mark.parametrize(
    ("path_id", "body_id", "needle"),
    [("root-fs", "root-fs", "[A-Za-z0-9_]+"), ("rootfs", "other", "does not match")],
)
async def test_drive_ids_follow_firecrackers_rules(
    fake: Fake, path_id: str, body_id: str, needle: str
) -> None:
    body = {"drive_id": body_id, "path_on_host": str(fake.disk), "is_root_device": True}
    err = await fake.rejected("PUT", f"/drives/{path_id}", body)
    assert needle in (err.fault_message or "")


async def test_iface_id_must_match_the_path(fake: Fake) -> None:
    body = {"iface_id": "eth1", "host_dev_name": "tap0"}
    err = await fake.rejected("PUT", "/network-interfaces/eth0", body)
    assert "does not match" in (err.fault_message or "")
    await fake.ok("PUT", "/network-interfaces/eth1", body)


async def test_files_firecracker_opens_must_exist(fake: Fake) -> None:
    err = await fake.rejected("PUT", "/boot-source", {"kernel_image_path": str(fake.workdir / "nope")})
    assert "nope" in (err.fault_message or "")


async def test_only_one_root_drive(fake: Fake) -> None:
    await fake.ok(
        "PUT", "/drives/a", {"drive_id": "a", "path_on_host": str(fake.disk), "is_root_device": True}
    )
    await fake.rejected(
        "PUT", "/drives/b", {"drive_id": "b", "path_on_host": str(fake.disk), "is_root_device": True}
    )


async def test_instance_start_needs_a_kernel_and_happens_once(fake: Fake) -> None:
    err = await fake.rejected("PUT", "/actions", {"action_type": "InstanceStart"})
    assert "kernel" in (err.fault_message or "")
    await fake.boot()
    await fake.rejected("PUT", "/actions", {"action_type": "InstanceStart"})


async def test_pre_boot_resources_are_refused_after_start(fake: Fake) -> None:
    await fake.boot()
    await fake.rejected("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    await fake.rejected("PUT", "/boot-source", {"kernel_image_path": str(fake.kernel)})
    await fake.rejected("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"})


async def test_post_boot_operations_are_refused_before_start(fake: Fake) -> None:
    await fake.rejected("PATCH", "/vm", {"state": "Paused"})
    snap = {"snapshot_path": str(fake.workdir / "s"), "mem_file_path": str(fake.workdir / "m")}
    await fake.rejected("PUT", "/snapshot/create", snap)
    await fake.rejected("PUT", "/actions", {"action_type": "SendCtrlAltDel"})


async def test_snapshot_create_only_when_paused_and_writes_both_files(fake: Fake) -> None:
    await fake.boot()
    snap = {"snapshot_path": str(fake.workdir / "s"), "mem_file_path": str(fake.workdir / "m")}
    err = await fake.rejected("PUT", "/snapshot/create", snap)
    assert "not paused" in (err.fault_message or "")
    assert not (fake.workdir / "s").exists()
    await fake.ok("PATCH", "/vm", {"state": "Paused"})
    await fake.ok("PUT", "/snapshot/create", snap)
    assert (fake.workdir / "s").is_file() and (fake.workdir / "m").is_file()


async def test_snapshot_load_only_on_a_fresh_process(fake: Fake) -> None:
    await fake.boot()
    await fake.ok("PATCH", "/vm", {"state": "Paused"})
    files = {"snapshot_path": str(fake.workdir / "s"), "mem_file_path": str(fake.workdir / "m")}
    await fake.ok("PUT", "/snapshot/create", files)
    load = {
        "snapshot_path": files["snapshot_path"],
        "mem_backend": {"backend_type": "File", "backend_path": files["mem_file_path"]},
    }
    await fake.rejected("PUT", "/snapshot/load", load)  # this process already booted

    with short_tmp_dir() as second_dir:
        proc = await spawn(second_dir)
        try:
            async with SocketClient(second_dir / "api.sock") as client:
                second = Fake(second_dir, client)
                await second.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
                err = await second.rejected("PUT", "/snapshot/load", load)
                assert "not allowed" in (err.fault_message or "")
        finally:
            proc.kill()
            await proc.wait()

    with short_tmp_dir() as third_dir:
        proc = await spawn(third_dir)
        try:
            async with SocketClient(third_dir / "api.sock") as client:
                third = Fake(third_dir, client)
                await third.ok("PUT", "/snapshot/load", {**load, "resume_vm": True})
                assert await third.state() == "Running"
        finally:
            proc.kill()
            await proc.wait()


async def test_snapshot_load_overrides_must_name_known_devices(fake: Fake) -> None:
    await fake.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"})
    await fake.boot()
    await fake.ok("PATCH", "/vm", {"state": "Paused"})
    files = {"snapshot_path": str(fake.workdir / "s"), "mem_file_path": str(fake.workdir / "m")}
    await fake.ok("PUT", "/snapshot/create", files)
    load: dict[str, Any] = {
        "snapshot_path": files["snapshot_path"],
        "mem_backend": {"backend_type": "File", "backend_path": files["mem_file_path"]},
    }
    for body in (
        {**load, "network_overrides": [{"iface_id": "eth9", "host_dev_name": "tap1"}]},
        {**load, "vsock_override": {"uds_path": "/tmp/v.sock"}},
        {**load, "mem_file_path": files["mem_file_path"]},  # both memory sources
    ):
        with short_tmp_dir() as fresh:
            proc = await spawn(fresh)
            try:
                async with SocketClient(fresh / "api.sock") as client:
                    await Fake(fresh, client).rejected("PUT", "/snapshot/load", body)
            finally:
                proc.kill()
                await proc.wait()
    with short_tmp_dir() as fresh:
        proc = await spawn(fresh)
        try:
            async with SocketClient(fresh / "api.sock") as client:
                ok = {**load, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]}
                await Fake(fresh, client).ok("PUT", "/snapshot/load", ok)
                config = await client.get("/vm/config")
                assert config["network-interfaces"][0]["host_dev_name"] == "tap1"
        finally:
            proc.kill()
            await proc.wait()


async def test_send_ctrl_alt_del_makes_it_exit(fake: Fake) -> None:
    await fake.boot()
    await fake.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    with pytest.raises(SmartVMError) as info:
        for _ in range(500):
            await fake.client.get("/")
            await asyncio.sleep(0.02)
    assert info.value.code == ErrorCode.API_CONNECTION_FAILED


async def test_request_delay_knob_produces_client_timeouts() -> None:
    with short_tmp_dir() as workdir:
        binary = make_fake_binary(workdir, "--request-delay", "600")
        proc = await spawn(workdir, binary)
        try:
            async with SocketClient(workdir / "api.sock", timeout=0.3) as client:
                with pytest.raises(SmartVMError) as info:
                    await client.get("/")
            assert info.value.code == ErrorCode.API_TIMEOUT
        finally:
            proc.kill()
            await proc.wait()
