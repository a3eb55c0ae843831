"""The project's real python image booted by QemuMachine from a Firecracker-style VMConfig.

End to end through the QEMU backend: compiled kernel + qcow2 overlay over the base image as root
drive, the guest agent on a virtio-serial port, and a memory snapshot restored into a fresh QEMU
that keeps the guest's state. Builds the images on first use (minutes; cached afterwards).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from exec_sandbox.client.agent import AgentClient
from exec_sandbox.vm_manager import ImageBundle
from smartvm.config import VMConfig
from smartvm.qemu import QemuMachine
from smartvm.vmm.base import SnapshotFiles

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

AGENT_PORT = "org.exec_sandbox.agent"


async def _overlay(base: Path, target: Path) -> Path:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(target)
    )
    assert await proc.wait() == 0
    return target


async def _exec(machine: QemuMachine, code: str) -> str:
    client = await AgentClient.open_unix(machine.serial_socket(AGENT_PORT))
    async with client:
        await client.wait_ready(timeout=120)
        result = await client.exec(code, language="python")
    assert result.exit_code == 0, result.stderr
    return result.stdout


async def test_python_image_boots_and_survives_snapshot(
    python_bundle: ImageBundle, runtime_dir: Path, tmp_path: Path, machines: list[QemuMachine]
) -> None:
    base_mtime = python_bundle.rootfs.stat().st_mtime_ns
    overlay = await _overlay(python_bundle.rootfs, tmp_path / "root.qcow2")
    config = VMConfig(
        {
            "boot_source": {
                "kernel_image_path": str(python_bundle.kernel),
                "boot_args": python_bundle.boot_args,
            },
            "machine_config": {"vcpu_count": 1, "mem_size_mib": 128},
            "drives": [{"drive_id": "rootfs", "path_on_host": str(overlay), "is_root_device": True}],
        }
    )
    source = QemuMachine(
        runtime_dir=runtime_dir, serial_ports=(AGENT_PORT,), shared_memory=True, acpi=python_bundle.needs_acpi
    )
    machines.append(source)
    await source.start(config)
    assert await _exec(source, "print(1 + 1)") == "2\n"
    await _exec(source, "open('/tmp/state', 'w').write('kept in guest RAM')")

    files = SnapshotFiles(tmp_path / "snap" / "state", tmp_path / "snap" / "memory")
    await source.save_memory_snapshot(files)
    await source.stop()

    clone = QemuMachine(runtime_dir=runtime_dir)
    machines.append(clone)
    await clone.load_snapshot(files)
    assert await _exec(clone, "print(open('/tmp/state').read())") == "kept in guest RAM\n"
    await clone.stop()
    assert python_bundle.rootfs.stat().st_mtime_ns == base_mtime  # the base image was never written
