"""The no-compile fallback: Debian's cloud kernel + initramfs, built and booted under TCG (ACPI on)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from exec_sandbox.settings import Settings
from exec_sandbox.vm_manager import VmManager

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_cloud_kernel_bundle_builds_and_boots(tmp_path: Path) -> None:
    # Private images dir; the .deb cache (cache_dir) is shared so nothing is downloaded twice.
    settings = Settings(images_dir=tmp_path / "images", kernel_flavor="debian-cloud")
    bundle = VmManager(settings).get_bundle("raw")
    assert bundle.kernel_flavor == "debian-cloud"
    assert bundle.needs_acpi is True
    assert bundle.initrd is not None
    manifest = json.loads(bundle.manifest.read_text())
    assert manifest["initrd"]["sha256"] == hashlib.sha256(bundle.initrd.read_bytes()).hexdigest()
    assert not any(p["name"].startswith("linux-image-") for p in manifest["packages"])
    assert {"python3-minimal", "busybox-static"} <= {p["name"] for p in manifest["packages"]}

    append = f'{bundle.boot_args} init=/bin/sh -- -c "echo SBX-CLOUD $(python3 -c \'print(6*7)\'); reboot -f"'
    argv = [
        "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg",  # microvm's default: ACPI on
        "-nodefaults", "-no-user-config", "-nographic", "-m", "256", "-no-reboot",
        "-kernel", str(bundle.kernel), "-initrd", str(bundle.initrd), "-append", append,
        "-serial", "stdio",
        "-drive", f"id=root,file={bundle.rootfs},format=qcow2,if=none,snapshot=on",
        "-device", "virtio-blk-device,drive=root", "-device", "virtio-rng-device",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "SBX-CLOUD 42" in proc.stdout, proc.stdout[-3000:]
