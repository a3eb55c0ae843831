"""Test helpers for running FirecrackerMachine / MicroVM against the fake or a real Firecracker."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from smartvm.vmm.firecracker import FirecrackerMachine

__all__ = [
    "FAKE_BINARY",
    "FAKE_SERVER",
    "TARGET_KINDS",
    "Target",
    "kvm_usable",
    "machine_for",
    "make_fake_binary",
    "make_target",
    "pid_alive",
    "read_pid",
    "real_firecracker_skip_reason",
    "short_tmp_dir",
    "target_fixture",
]

FAKE_DIR = Path(__file__).resolve().parent
FAKE_SERVER = FAKE_DIR / "server.py"
FAKE_BINARY = FAKE_DIR / "firecracker"
TARGET_KINDS = ["fake", "real"]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie is dead, merely unreaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def read_pid(pid_file: Path) -> int:
    return int(pid_file.read_text().strip())


def make_fake_binary(directory: Path, *args: str, env: dict[str, str] | None = None) -> Path:
    """A ``firecracker`` stand-in in ``directory`` that runs the fake with extra ``args`` baked in."""
    binary = directory / "firecracker"
    exports = "".join(f"export {k}={v!r}\n" for k, v in (env or {}).items())
    quoted = " ".join(repr(a) for a in args)
    binary.write_text(f'#!/bin/sh\n{exports}exec {sys.executable!r} {str(FAKE_SERVER)!r} {quoted} "$@"\n')
    binary.chmod(0o755)
    return binary


@contextlib.contextmanager
def short_tmp_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="svfc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def kvm_usable() -> bool:
    # kvm_pvm is a paravirtual KVM on which ordinary guests hang: treat it as unusable.
    if Path("/sys/module/kvm_pvm").exists():
        return False
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def real_firecracker_skip_reason() -> str | None:
    if shutil.which("firecracker") is None:
        return "no `firecracker` binary on PATH"
    if not kvm_usable():
        return "/dev/kvm is missing, not read-write, or the paravirtual kvm_pvm (guests hang)"
    for var in ("SMARTVM_TEST_KERNEL", "SMARTVM_TEST_ROOTFS"):
        value = os.environ.get(var)
        if not value or not Path(value).is_file():
            return f"set {var} to an uncompressed guest kernel / ext4 rootfs to test a real Firecracker"
    return None


@dataclass
class Target:
    """Where a lifecycle test runs: the fake server or a real ``firecracker``."""

    kind: str  # "fake" | "real"
    binary: Path
    workdir: Path
    kernel: Path
    rootfs: Path

    @property
    def socket_path(self) -> Path:
        return self.workdir / "api.sock"

    def config(self, vm_id: str = "lifecycle-vm", **overrides: Any) -> dict[str, Any]:
        rootfs = self.rootfs
        if self.kind == "real":
            # The guest writes to its root drive: give each test its own copy.
            rootfs = self.workdir / "rootfs.ext4"
            if not rootfs.exists():
                shutil.copyfile(self.rootfs, rootfs)
        config: dict[str, Any] = {
            "id": vm_id,
            "boot_source": {
                "kernel_image_path": str(self.kernel),
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
            },
            "machine_config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": False},
            "drives": [
                {
                    "drive_id": "rootfs",
                    "path_on_host": str(rootfs),
                    "is_root_device": True,
                    "is_read_only": False,
                }
            ],
        }
        config.update(overrides)
        return config


def make_target(kind: str, workdir: Path) -> Target:
    if kind == "real":
        binary = shutil.which("firecracker")
        assert binary is not None
        return Target(
            kind,
            Path(binary),
            workdir,
            Path(os.environ["SMARTVM_TEST_KERNEL"]),
            Path(os.environ["SMARTVM_TEST_ROOTFS"]),
        )
    kernel = workdir / "vmlinux"
    kernel.write_bytes(b"not really a kernel: the fake only checks that the file exists")
    rootfs = workdir / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    return Target(kind, make_fake_binary(workdir), workdir, kernel, rootfs)


def target_fixture(kind: str) -> Iterator[Target]:
    """Body of a ``target`` fixture parametrized over :data:`TARGET_KINDS`; skips "real" with the reason."""
    if kind == "real":
        reason = real_firecracker_skip_reason()
        if reason is not None:
            pytest.skip(reason)
    with short_tmp_dir() as workdir:
        yield make_target(kind, workdir)


def machine_for(target: Target, **kwargs: Any) -> FirecrackerMachine:
    # The fake is a Python program: give it room to start on a busy machine.
    kwargs.setdefault("socket_timeout", 30.0)
    binary = kwargs.pop("binary_path", target.binary)
    return FirecrackerMachine(binary, target.socket_path, **kwargs)
