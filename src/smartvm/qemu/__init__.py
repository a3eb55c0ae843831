"""The QEMU backend: ``-M microvm`` machines driven over QMP (``qemu.qmp``).

Modules: :mod:`.accel` (KVM or TCG), :mod:`.argv` (the one pure argv builder and the
Firecracker-config mapping), :mod:`.qmp` (the one QMP client), :mod:`.console` (console ring
buffer), :mod:`.process` (parent-death signal, owner records, reaping), :mod:`.machine`
(:class:`QemuMachine`, the :class:`~smartvm.vmm.base.VmmBackend` implementation).
"""

from smartvm.qemu.accel import ACCEL_ENV_VAR, AccelChoice, choose_accelerator, probe_kvm
from smartvm.qemu.argv import (
    DriveSpec,
    GuestForward,
    HostForward,
    MemoryBackendSpec,
    QemuMachineSpec,
    SerialPortSpec,
    TapNicSpec,
    UserNetSpec,
    VsockSpec,
    build_argv,
    build_kernel_cmdline,
    spec_from_vmconfig,
    with_host_tsc,
)
from smartvm.qemu.console import ConsoleBuffer
from smartvm.qemu.machine import MachineState, QemuMachine
from smartvm.qemu.process import default_runtime_dir, reap_leftovers
from smartvm.qemu.qmp import QmpConnection

__all__ = [
    "ACCEL_ENV_VAR",
    "AccelChoice",
    "ConsoleBuffer",
    "DriveSpec",
    "GuestForward",
    "HostForward",
    "MachineState",
    "MemoryBackendSpec",
    "QemuMachine",
    "QemuMachineSpec",
    "QmpConnection",
    "SerialPortSpec",
    "TapNicSpec",
    "UserNetSpec",
    "VsockSpec",
    "build_argv",
    "build_kernel_cmdline",
    "choose_accelerator",
    "default_runtime_dir",
    "probe_kvm",
    "reap_leftovers",
    "spec_from_vmconfig",
    "with_host_tsc",
]
