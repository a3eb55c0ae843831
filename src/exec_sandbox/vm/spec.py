"""What a sandbox VM is, before one runs: :class:`VmOptions`, the pure machine description
(:func:`build_machine_spec`, :func:`build_kernel_cmdline`, :func:`build_user_net`), its state enum and
boot timing, and the snapshot directory format. No processes here; the VM
itself is :mod:`exec_sandbox.vm.sandbox_vm`.

Snapshots (:meth:`SandboxVm.save_snapshot` / :meth:`SandboxVm.restore_from`): a directory holding
the QEMU device state (``vmstate``, plus smartvm's ``vmstate.qemu.json`` sidecar), guest RAM
(``memory``; only with ``VmOptions.shared_memory``, else RAM is streamed into ``vmstate``), a copy
of the overlay taken while the guest was paused (``disk.qcow2``, so disk and memory match) and
``sandbox.json`` (options, base image). Every restore copies ``disk.qcow2`` to a fresh overlay, so
one snapshot serves many clones; each restored guest is reseeded through ``agent.reseed_rng``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from exec_sandbox.errors import SandboxInputError
from exec_sandbox.protocol.agent import Language
from exec_sandbox.settings import KernelFlavor
from smartvm.qemu import (
    DriveSpec,
    HostForward,
    QemuMachineSpec,
    UserNetSpec,
)

__all__ = [
    "AGENT_PORT_NAME",
    "COLD_BOOT_TB_SIZE_MIB",
    "SNAPSHOT_FORMAT",
    "BootTiming",
    "PortForward",
    "SandboxVmState",
    "VmOptions",
    "build_kernel_cmdline",
    "build_machine_spec",
    "build_user_net",
    "read_snapshot_dir",
    "respec_for_restore",
    "snapshot_meta",
]

logger = logging.getLogger(__name__)


# The port name the guest agent looks for (sbx_agent/wire.py DEFAULT_PORT_NAME).
AGENT_PORT_NAME = "org.exec_sandbox.agent"


SNAPSHOT_FORMAT = 1


_ROOT_DRIVE_ID = "root"


# TCG code cache of a cold-booted VM. Boot + agent + the first one-shot Python run translate ~53 MB of
# guest code; smartvm's default 32 MiB cache overflowed twice on that path and QEMU retranslated
# everything after each flush (~0.6 s of a cold run). The cost: only generated code is resident, so
# a cold VM holds ~53 MiB of code instead of at most 32, and a VM that translates less costs no more.
# Restored VMs keep the size recorded in their snapshot's spec.
COLD_BOOT_TB_SIZE_MIB = 64


class PortForward(BaseModel):
    """Forward ``host_addr:host_port`` (0 = QEMU picks nothing: give a real port) to ``guest_port``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    guest_port: int = Field(ge=1, le=65535)
    host_port: int = Field(ge=1, le=65535)
    host_addr: str = "127.0.0.1"
    protocol: Literal["tcp", "udp"] = "tcp"


class VmOptions(BaseModel):
    """What one sandbox VM is made of. Frozen and validated; safe to share between boots.

    ``network``: user-mode networking with outbound access; off by default. ``port_forwards``
    without ``network`` gives a restricted user-mode NIC that only carries the forwards.
    ``nic``: a virtio-net device whose backend is handed to :meth:`SandboxVm.boot` /
    :meth:`SandboxVm.restore_from` (``user_net``; a sandbox's egress link, see
    :mod:`exec_sandbox.vm.network`); in the snapshot key, so a guest with a NIC is restored only
    from a snapshot of one.
    ``accel``: force ``"kvm"``/``"tcg"``; None follows ``Settings.force_emulation`` (True -> TCG)
    and otherwise smartvm's probe. ``shared_memory``: guest RAM in a /dev/shm file so snapshots do
    not stream RAM (the fast snapshot path). ``kernel_args``: extra kernel arguments appended to the
    bundle's; ``kernel_cmdline`` replaces the bundle's command line entirely.
    ``env``: default environment merged under the ``env`` of every :meth:`SandboxVm.exec`.
    ``base_layer``: boot from this L2 package layer (a qcow2 backed by the image's rootfs).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    language: Language
    memory_mb: int = Field(default=256, ge=64, le=64 * 1024)
    vcpus: int = Field(default=1, ge=1, le=64)
    boot_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    network: bool = False
    port_forwards: tuple[PortForward, ...] = ()
    nic: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    accel: Literal["kvm", "tcg"] | None = None
    shared_memory: bool = False
    kernel_flavor: KernelFlavor | None = None
    kernel_args: tuple[str, ...] = ()
    kernel_cmdline: str | None = None
    # The guest disk's virtual size, MiB (None: the image's); the guest grows its filesystem to it.
    disk_size_mb: int | None = Field(default=None, ge=256, le=1024 * 1024)
    # An L2 package layer (exec_sandbox.packages.layers) to boot from instead of the bundle's rootfs
    # (its backing file); its sha256 is part of the options, so L1 snapshots key on the layer too.
    base_layer: Path | None = None
    base_layer_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("kernel_args")
    @classmethod
    def _args_are_tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for arg in value:
            if not arg or any(ch.isspace() or ch == "\x00" for ch in arg):
                raise ValueError(f"kernel argument must be one non-empty token without spaces: {arg!r}")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, val in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or "\x00" in val:
                raise ValueError(f"invalid environment variable {name!r}")
        return value


@dataclass
class BootTiming:
    """Milliseconds spent per boot phase (restore: ``qemu_spawn_ms`` covers the restore)."""

    image_ms: float = 0.0  # finding (or building) the bundle
    overlay_ms: float = 0.0
    qemu_spawn_ms: float = 0.0  # QEMU process started and QMP answering (restore: state loaded)
    boot_to_agent_ms: float = 0.0  # from QEMU running to the agent's hello
    reseed_ms: float = 0.0  # restore only
    total_ms: float = 0.0
    overlay_from_pool: bool = False
    restored: bool = False


class SandboxVmState(StrEnum):
    BOOTING = "booting"
    READY = "ready"
    PAUSED = "paused"
    CLOSING = "closing"
    CLOSED = "closed"


def build_kernel_cmdline(bundle_args: str, options: VmOptions) -> str:
    """The guest kernel command line: the bundle's (or the override) plus ``options.kernel_args``."""
    base = options.kernel_cmdline if options.kernel_cmdline is not None else bundle_args
    return " ".join([*base.split(), *options.kernel_args])


def build_machine_spec(
    *,
    kernel: Path,
    initrd: Path | None,
    boot_args: str,
    needs_acpi: bool,
    overlay: Path,
    options: VmOptions,
    name: str | None = None,
) -> QemuMachineSpec:
    """Describe the QEMU machine of one sandbox VM. Pure.

    Runtime parts (accelerator, QMP socket, the agent port's socket, user net, RAM file) are added
    by :class:`QemuMachine` from its constructor arguments.
    """
    return QemuMachineSpec(
        name=name,
        kernel=kernel,
        initrd=initrd,
        cmdline=build_kernel_cmdline(boot_args, options),
        vcpus=options.vcpus,
        memory_mib=options.memory_mb,
        acpi=needs_acpi,
        drives=(DriveSpec(id=_ROOT_DRIVE_ID, path=overlay, format="qcow2", cache="writeback"),),
        rng=True,
        tb_size_mib=COLD_BOOT_TB_SIZE_MIB,
    )


def build_user_net(options: VmOptions) -> UserNetSpec | None:
    """User-mode networking for ``options``: None when neither network nor forwards are wanted."""
    if not options.network and not options.port_forwards and not options.nic:
        return None
    return UserNetSpec(
        restrict=not options.network,
        hostfwd=tuple(
            HostForward(
                protocol=f.protocol, host_addr=f.host_addr, host_port=f.host_port, guest_port=f.guest_port
            )
            for f in options.port_forwards
        ),
    )


def snapshot_meta(vm_id: str, options: VmOptions, base_image: Path, accel: str | None) -> dict[str, Any]:
    """The ``sandbox.json`` of a snapshot directory (see :mod:`exec_sandbox.vm.sandbox_vm`)."""
    return {
        "format": SNAPSHOT_FORMAT,
        "vm_id": vm_id,
        "options": options.model_dump(mode="json"),
        "base_image": str(base_image),
        "accel": accel,
        "created_at": time.time(),
    }


def read_snapshot_dir(directory: Path) -> tuple[VmOptions, Path, QemuMachineSpec]:
    """``(options, base_image, saved machine spec)`` of a snapshot directory; ``SandboxInputError``
    if it is not one."""
    try:
        meta = json.loads((directory / "sandbox.json").read_text())
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unsupported snapshot format {meta.get('format')!r}")
        options = VmOptions.model_validate(meta["options"])
        base_image = Path(meta["base_image"])
        sidecar = json.loads((directory / "vmstate.qemu.json").read_text())
        saved_spec = QemuMachineSpec.model_validate(sidecar["spec"])
    except (OSError, ValueError, KeyError, ValidationError) as exc:
        raise SandboxInputError(
            f"not a sandbox snapshot directory: {directory}: {exc}", context={"directory": str(directory)}
        ) from exc
    return options, base_image, saved_spec


def respec_for_restore(saved_spec: QemuMachineSpec, overlay: Path, new_id: str) -> QemuMachineSpec:
    """The saved machine, renamed for ``new_id`` and writing to its own copy of the disk."""
    drives = tuple(
        d.model_copy(update={"path": overlay}) if d.id == _ROOT_DRIVE_ID else d for d in saved_spec.drives
    )
    return saved_spec.model_copy(update={"drives": drives, "name": f"sbx-{new_id}"})
