"""Accelerator choice from fake /dev/kvm, /proc/cpuinfo and /sys/module inputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from smartvm.errors import SmartVMError
from smartvm.qemu.accel import AccelChoice, choose_accelerator, probe_kvm

VMX = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\n"
SVM = "processor\t: 0\nflags\t\t: fpu svm lm\n"
NONE = "processor\t: 0\nflags\t\t: fpu vme de pse sse2 hypervisor\nvmx flags\t: foo\n"


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path]:
    dev = tmp_path / "kvm"
    dev.write_text("")
    dev.chmod(0o666)
    modules = tmp_path / "module"
    (modules / "kvm").mkdir(parents=True)
    return dev, modules


def test_kvm_when_everything_fits(host: tuple[Path, Path]) -> None:
    dev, modules = host
    for cpuinfo in (VMX, SVM):
        choice = choose_accelerator(environ={}, dev_kvm=dev, cpuinfo_text=cpuinfo, sys_module_dir=modules)
        assert choice.accel == "kvm"


def test_tcg_reasons(host: tuple[Path, Path], tmp_path: Path) -> None:
    dev, modules = host
    missing = choose_accelerator(
        environ={}, dev_kvm=tmp_path / "nope", cpuinfo_text=VMX, sys_module_dir=modules
    )
    assert missing.accel == "tcg" and "does not exist" in missing.reason
    # a "vmx flags" line is not the flags line: no hardware virtualisation exposed
    noflag = choose_accelerator(environ={}, dev_kvm=dev, cpuinfo_text=NONE, sys_module_dir=modules)
    assert noflag.accel == "tcg" and "neither vmx nor svm" in noflag.reason
    (modules / "kvm_pvm").mkdir()
    pvm = choose_accelerator(environ={}, dev_kvm=dev, cpuinfo_text=VMX, sys_module_dir=modules)
    assert pvm.accel == "tcg" and "kvm_pvm" in pvm.reason


def test_not_read_write(host: tuple[Path, Path]) -> None:
    dev, modules = host
    usable, reason = probe_kvm(dev_kvm=dev, cpuinfo_text=VMX, sys_module_dir=modules)
    assert usable
    # root may open anything, so the permission answer is injected (as os.access would give it)
    seen: list[int] = []

    def read_only(path: Path, mode: int) -> bool:
        seen.append(mode)
        return False

    usable, reason = probe_kvm(dev_kvm=dev, cpuinfo_text=VMX, sys_module_dir=modules, access=read_only)
    assert not usable and "read-write" in reason
    assert seen == [os.R_OK | os.W_OK]


def test_overrides_and_logging(host: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    dev, modules = host
    (modules / "kvm_pvm").mkdir()
    with caplog.at_level(logging.INFO, logger="smartvm.qemu.accel"):
        forced = choose_accelerator(
            environ={"SMARTVM_ACCEL": "KVM"}, dev_kvm=dev, cpuinfo_text=VMX, sys_module_dir=modules
        )
    assert forced.accel == "kvm" and "SMARTVM_ACCEL" in forced.reason and "kvm_pvm" in forced.reason
    assert [r.getMessage() for r in caplog.records] == [f"QEMU accelerator: kvm ({forced.reason})"]
    # the argument beats the environment
    arg = choose_accelerator("tcg", environ={"SMARTVM_ACCEL": "kvm"}, dev_kvm=dev, cpuinfo_text=VMX)
    assert arg == AccelChoice("tcg", "forced by argument")
    with pytest.raises(SmartVMError) as info:
        choose_accelerator(environ={"SMARTVM_ACCEL": "hvf"})
    assert info.value.code == "INVALID_ARGUMENT" and "hvf" in info.value.message
