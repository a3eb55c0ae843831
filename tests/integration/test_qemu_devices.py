"""Devices seen from inside the guest: disk order/format from a Firecracker-style VMConfig, virtio-serial.

These need a kernel with virtio-mmio, virtio-blk and virtio-console built in: the project's
compiled kernel (built on first use, which takes minutes), or ``$SMARTVM_TEST_KERNEL``.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smartvm.config import VMConfig
from smartvm.qemu import HostForward, QemuMachine, QemuMachineSpec, UserNetSpec, build_kernel_cmdline
from tests.integration.qemu_guest import guest_initramfs, project_kernel

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

BOOT_TIMEOUT = 120.0


@pytest.fixture(scope="session")
def virtio_kernel() -> Path:
    override = os.environ.get("SMARTVM_TEST_KERNEL")
    return Path(override) if override else project_kernel()


async def test_vmconfig_drives_root_first_and_formats(
    virtio_kernel: Path, runtime_dir: Path, tmp_path: Path, machines: list[QemuMachine]
) -> None:
    data = tmp_path / "data.img"
    data.write_bytes(b"\0" * (1 << 20))
    root = tmp_path / "root.img"
    root.write_bytes(b"\0" * (2 << 20))
    extra = tmp_path / "extra.qcow2"
    proc = await asyncio.create_subprocess_exec("qemu-img", "create", "-q", "-f", "qcow2", str(extra), "3M")
    assert await proc.wait() == 0
    config = VMConfig(
        {
            "boot_source": {
                "kernel_image_path": str(virtio_kernel),
                "initrd_path": str(guest_initramfs()),
                "boot_args": "console=ttyS0 reboot=k panic=-1 smartvm.test=disks",
            },
            "machine_config": {"vcpu_count": 1, "mem_size_mib": 96},
            "drives": [
                {"drive_id": "data", "path_on_host": str(data), "is_root_device": False},
                {
                    "drive_id": "rootfs",
                    "path_on_host": str(root),
                    "is_root_device": True,
                    "is_read_only": True,
                },
                {
                    "drive_id": "extra",
                    "path_on_host": str(extra),
                    "is_root_device": False,
                    "cache_type": "Unsafe",
                },
            ],
        }
    )
    config.ensure_valid()
    machine = QemuMachine(runtime_dir=runtime_dir)
    machines.append(machine)
    await machine.start(config)
    async with asyncio.timeout(BOOT_TIMEOUT):
        await machine.console.wait_for("DISKS-DONE")
    disks = dict(re.findall(r"^DISK (vd[a-z]) (\d+)\r?$", machine.console_output(), re.MULTILINE))
    # root first (vda) like Firecracker, then the others in config order; qcow2 is read as qcow2
    assert disks == {"vda": str(4096), "vdb": str(2048), "vdc": str(6144)}
    assert machine.spec is not None and "root=/dev/vda ro" in machine.spec.cmdline
    await machine.stop()
    assert not machine.vm_dir.exists()


async def test_virtio_serial_ports_reach_the_host(
    virtio_kernel: Path, runtime_dir: Path, machines: list[QemuMachine]
) -> None:
    spec = QemuMachineSpec(
        kernel=virtio_kernel,
        initrd=guest_initramfs(),
        cmdline=build_kernel_cmdline(None) + " smartvm.test=serial",
        memory_mib=96,
    )
    names = ("org.smartvm.agent", "org.smartvm.extra")
    machine = QemuMachine(spec, runtime_dir=runtime_dir, serial_ports=names)
    machines.append(machine)
    await machine.start()
    sockets = [machine.serial_socket(name) for name in names]
    assert all(path.is_socket() for path in sockets)
    for name, path in zip(names, sockets, strict=True):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            async with asyncio.timeout(BOOT_TIMEOUT):
                line = await reader.readline()
            assert line.decode().strip() == f"PORT {name}"
        finally:
            writer.close()
            await writer.wait_closed()
    await machine.stop()
    assert not any(path.exists() for path in sockets)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_user_net_hostfwd_reaches_guest_server(
    virtio_kernel: Path, runtime_dir: Path, machines: list[QemuMachine]
) -> None:
    port = _free_port()
    spec = QemuMachineSpec(
        kernel=virtio_kernel,
        initrd=guest_initramfs(),
        cmdline=build_kernel_cmdline(None) + " smartvm.test=net",
        memory_mib=96,
    )
    user_net = UserNetSpec(restrict=True, hostfwd=(HostForward(host_port=port, guest_port=80),))
    machine = QemuMachine(spec, runtime_dir=runtime_dir, user_net=user_net)
    machines.append(machine)
    await machine.start()
    async with asyncio.timeout(BOOT_TIMEOUT):
        await machine.console.wait_for("NET-UP")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /index.html HTTP/1.0\r\nHost: guest\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(60):
            response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert response.startswith(b"HTTP/1.") and b" 200 " in response.split(b"\r\n", 1)[0]
    assert response.rstrip().endswith(b"hello-from-guest")
    await machine.stop()


TAP_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from smartvm.qemu import QemuMachine, QemuMachineSpec, TapNicSpec, build_kernel_cmdline

    async def main():
        kernel, initrd, tap, runtime_dir = sys.argv[1:5]
        spec = QemuMachineSpec(
            kernel=Path(kernel),
            initrd=Path(initrd),
            cmdline=build_kernel_cmdline(None) + " smartvm.test=net",
            memory_mib=96,
            nics=(TapNicSpec(id="eth0", tap=tap, mac="02:00:00:00:00:02"),),
        )
        async with QemuMachine(spec, runtime_dir=Path(runtime_dir)) as machine:
            async with asyncio.timeout(120):
                await machine.console.wait_for("NET-UP")
                reader, writer = await asyncio.open_connection("10.0.2.15", 80)
                writer.write(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
                await writer.drain()
                print((await reader.read()).decode(), flush=True)
                writer.close()
                await writer.wait_closed()

    asyncio.run(main())
    """
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.mark.netns
def test_tap_nic_inside_a_network_namespace(virtio_kernel: Path, runtime_dir: Path) -> None:
    netns, tap = f"svq{os.getpid()}", "svqtap0"
    _ip("netns", "add", netns)
    try:
        for args in (
            ("tuntap", "add", "dev", tap, "mode", "tap"),
            ("addr", "add", "10.0.2.2/24", "dev", tap),
            ("link", "set", tap, "up"),
            ("link", "set", "lo", "up"),
        ):
            _ip("-n", netns, *args)
        child_args = [str(virtio_kernel), str(guest_initramfs()), tap, str(runtime_dir)]
        done = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", TAP_CHILD, *child_args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert " 200 " in done.stdout.splitlines()[0] and "hello-from-guest" in done.stdout
    finally:
        _ip("netns", "del", netns)
    assert os.listdir(runtime_dir) == []
