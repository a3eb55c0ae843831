"""SmartVM(vmm="qemu") end to end with the project's real guest image under TCG.

The image bundle built by exec_sandbox is ingested by smartvm's BaseImageManager as a hosted
manifest, then booted through the facade (per-VM rootfs copy, QEMU backend), driven through
pause/resume/snapshot, and cleaned up — also through the `smartvm` CLI's supervisor.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exec_sandbox.vm_manager import ImageBundle
from smartvm import BaseImageBundle, MicroVMState, SmartVM, SmartVMError, VmmRunState
from smartvm.qemu import QemuMachine
from tests.fake_firecracker.harness import pid_alive, short_tmp_dir
from tests.integration.conftest import child_processes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# Printed by the kernel (without `quiet`) once the root filesystem is mounted and init runs.
INIT_MARKER = "Run /sbin/init as init process"


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with short_tmp_dir() as d:
        yield d


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verbose_config(bundle: BaseImageBundle) -> dict[str, Any]:
    args = " ".join(a for a in bundle.boot_args.split() if a != "quiet")
    return {
        "boot_source": {"kernel_image_path": bundle.kernel_image_path, "boot_args": args},
        "machine_config": {"vcpu_count": 1, "mem_size_mib": 128},
    }


async def test_facade_boots_real_image_and_cleans_up(python_bundle: ImageBundle, data_dir: Path) -> None:
    async with SmartVM(vmm="qemu", data_dir=data_dir, base_image_cache_dir=data_dir / "bi") as svm:
        bundle = await svm.base_image_manager.ensure_base_image(manifest_path=python_bundle.manifest)
        assert bundle.source.type == "hosted-manifest"
        base_sum = sha256(Path(bundle.rootfs_path))
        vm = await svm.create_vm(verbose_config(bundle), vm_id="real1", base_image=bundle)
        root = vm.config.config.drives[0]
        assert root.is_root_device and Path(str(root.path_on_host)) != Path(bundle.rootfs_path)
        await vm.start()
        assert vm.state is MicroVMState.RUNNING
        machine = vm.backend
        assert isinstance(machine, QemuMachine)
        await asyncio.wait_for(machine.console.wait_for(INIT_MARKER), 120)
        info = await vm.get_info()
        assert info.vmm == "qemu" and info.state is VmmRunState.RUNNING
        assert info.accelerator == "tcg" and info.pid == vm.pid
        await vm.pause()
        assert (await vm.get_info()).state is VmmRunState.PAUSED
        files = await vm.snapshot(data_dir / "s.vmstate", data_dir / "s.mem")
        assert files.snapshot_path.stat().st_size > 0
        await vm.resume()
        assert (await vm.get_info()).state is VmmRunState.RUNNING
        with pytest.raises(SmartVMError) as err:
            await vm.snapshot(data_dir / "t.vmstate", data_dir / "t.mem")
        assert err.value.code == "INVALID_STATE"
        qemu_pid = vm.pid
        assert qemu_pid is not None and pid_alive(qemu_pid)
    assert svm.vm_count == 0
    assert not pid_alive(qemu_pid)
    assert not [c for c in child_processes() if c[1].startswith("qemu")]
    assert not any((data_dir / "vms").rglob("*.qcow2")), "the per-VM rootfs copy was left behind"
    assert not any((data_dir / "qemu").iterdir())
    assert sha256(Path(bundle.rootfs_path)) == base_sum


async def test_facade_failed_start_leaves_nothing(python_bundle: ImageBundle, data_dir: Path) -> None:
    async with SmartVM(vmm="qemu", data_dir=data_dir, base_image_cache_dir=data_dir / "bi") as svm:
        bundle = await svm.base_image_manager.ensure_base_image(manifest_path=python_bundle.manifest)
        config = verbose_config(bundle)
        config["boot_source"]["kernel_image_path"] = str(data_dir / "missing-vmlinux")
        vm = await svm.create_vm(config, vm_id="broken", base_image=bundle)
        with pytest.raises(SmartVMError) as err:
            await vm.start()
        assert "missing-vmlinux" in str(err.value)
        assert vm.state is MicroVMState.ERROR
    assert not [c for c in child_processes() if c[1].startswith("qemu")]
    assert not any((data_dir / "vms").rglob("*.qcow2"))


def run_cli(data_dir: Path, *args: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "smartvm.cli", "--data-dir", str(data_dir), "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_cli_runs_a_real_qemu_vm(python_bundle: ImageBundle, data_dir: Path) -> None:
    overlay = data_dir / "root.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(python_bundle.rootfs),
            str(overlay),
        ],
        check=True,
    )
    cfg = data_dir / "vm.json"
    cfg.write_text(
        json.dumps(
            {
                "boot_source": {
                    "kernel_image_path": str(python_bundle.kernel),
                    "boot_args": python_bundle.boot_args,
                },
                "machine_config": {"vcpu_count": 1, "mem_size_mib": 128},
                "drives": [{"drive_id": "rootfs", "path_on_host": str(overlay), "is_root_device": True}],
            }
        )
    )
    run_cli(data_dir, "create", str(cfg), "--vmm", "qemu", "--id", "clivm", "--accel", "tcg")
    started = run_cli(data_dir, "start", "clivm", "--timeout", "120")
    sup, qemu = started["supervisor_pid"], started["vmm_pid"]
    try:
        info = run_cli(data_dir, "info", "clivm")
        assert info["vmm"] == "qemu" and info["accelerator"] == "tcg" and info["vmm_state"] == "Running"
        assert run_cli(data_dir, "pause", "clivm")["state"] == "paused"
        assert run_cli(data_dir, "info", "clivm")["vmm_state"] == "Paused"
        assert run_cli(data_dir, "resume", "clivm")["state"] == "running"
    finally:
        assert run_cli(data_dir, "stop", "clivm")["state"] == "stopped"
    assert not pid_alive(sup) and not pid_alive(qemu)
