"""A cold-booted sandbox VM gets a TCG code cache big enough for boot + agent + a first run.

With smartvm's 32 MiB default the cache overflowed twice on that path (``info jit``: TB flush
count 2, ~53 MB of code generated), and QEMU retranslated everything after each flush.
"""

from __future__ import annotations

from pathlib import Path

from exec_sandbox.vm.spec import COLD_BOOT_TB_SIZE_MIB, VmOptions, build_machine_spec
from smartvm.qemu import QemuMachineSpec, build_argv


def _spec() -> QemuMachineSpec:
    return build_machine_spec(
        kernel=Path("/k/vmlinux"),
        initrd=None,
        boot_args="console=ttyS0 root=/dev/vda rw",
        needs_acpi=False,
        overlay=Path("/run/x/ov.qcow2"),
        options=VmOptions(language="python"),
    )


def test_cold_boot_code_cache_holds_the_first_run() -> None:
    default = QemuMachineSpec.model_fields["tb_size_mib"].default
    assert COLD_BOOT_TB_SIZE_MIB >= 64 > default
    spec = _spec().model_copy(update={"accel": "tcg"})
    assert spec.tb_size_mib == COLD_BOOT_TB_SIZE_MIB
    argv = build_argv(spec)
    assert argv[argv.index("-accel") + 1] == f"tcg,tb-size={COLD_BOOT_TB_SIZE_MIB}"
