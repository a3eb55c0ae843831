"""The one pure QEMU argv builder, and the Firecracker-config -> QEMU-spec mapping.

Nothing here touches the host: :func:`build_argv` turns a validated
:class:`QemuMachineSpec` into a list of strings, so every flag is unit-tested.
Runtime paths (QMP socket, memory file, incoming) are fields of the spec that
:class:`~smartvm.qemu.machine.QemuMachine` fills in before calling the builder.

Devices are virtio-mmio (``-M microvm`` on x86_64). Per-architecture facts live
in :data:`ARCH_PROFILES` so aarch64 (``-M virt``, which also has virtio-mmio and
a PL011 console) is one more entry, not a second builder.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from smartvm.config.models import VMConfigModel
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.qemu.accel import Accelerator

if TYPE_CHECKING:
    from smartvm.config.models import Drive

__all__ = [
    "ARCH_PROFILES",
    "DEFAULT_BOOT_ARGS",
    "QEMU_GLIBC_TUNABLES",
    "ArchProfile",
    "DriveSpec",
    "GuestForward",
    "HostForward",
    "MemoryBackendSpec",
    "QemuMachineSpec",
    "SerialPortSpec",
    "SupportsVMConfig",
    "TapNicSpec",
    "UserNetSpec",
    "VsockSpec",
    "build_argv",
    "build_env",
    "build_kernel_cmdline",
    "escape_qemu_option_value",
    "exec_uri",
    "spec_from_vmconfig",
    "with_host_tsc",
]

Arch = Literal["x86_64"]
DriveFormat = Literal["raw", "qcow2"]
DriveCache = Literal["none", "writeback", "unsafe", "directsync", "writethrough"]

# Firecracker's own default lacks a console; ours keeps ttyS0 so boot logs can be captured.
# ``reboot=t`` + ``-no-reboot`` makes a guest ``reboot -f`` end QEMU (microvm without ACPI
# has no keyboard controller or ACPI reset to honour ``reboot=k``); ``panic=-1`` turns a
# guest panic into that same exit instead of a hung process.
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=t panic=-1 quiet"
# Under TCG the kernel's TSC calibration against the PIT fails when the host is loaded and the
# boot hangs ("tsc: Unable to calibrate against PIT"); telling it the frequency avoids both.
_TCG_TIMING_KEYS = ("tsc_early_khz", "lpj", "no_timer_check")

_ID = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_MAC = Annotated[str, Field(pattern=r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")]


@dataclass(frozen=True)
class ArchProfile:
    """What differs between guest architectures; everything else in the builder is shared."""

    binary: str
    machine: str
    cpu_tcg: str
    cpu_kvm: str
    # microvm only: "acpi=on|off" is a machine property there.
    has_acpi_switch: bool


ARCH_PROFILES: dict[str, ArchProfile] = {
    "x86_64": ArchProfile(
        binary="qemu-system-x86_64", machine="microvm", cpu_tcg="max", cpu_kvm="host", has_acpi_switch=True
    ),
    # "aarch64": ArchProfile("qemu-system-aarch64", "virt", "max", "host", has_acpi_switch=False),
}


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DriveSpec(_Spec):
    """One virtio-blk disk. ``format`` defaults from the file name (``.qcow2`` -> qcow2, else raw)."""

    id: _ID
    path: Path
    format: DriveFormat | None = None
    read_only: bool = False
    cache: DriveCache = "writeback"
    # QEMU block throttling, mapped from Firecracker's token buckets.
    bps_total: int | None = Field(default=None, gt=0)
    iops_total: int | None = Field(default=None, gt=0)

    @property
    def resolved_format(self) -> DriveFormat:
        if self.format is not None:
            return self.format
        return "qcow2" if self.path.suffix.lower() == ".qcow2" else "raw"


class TapNicSpec(_Spec):
    """virtio-net on an existing host TAP device (made by smartvm's NetworkManager)."""

    id: _ID
    tap: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,15}$")]
    mac: _MAC | None = None


class HostForward(_Spec):
    """``hostfwd`` of user-mode networking: host_addr:host_port -> guest_port."""

    protocol: Literal["tcp", "udp"] = "tcp"
    host_addr: str = "127.0.0.1"
    host_port: int = Field(ge=0, le=65535)
    guest_port: int = Field(ge=1, le=65535)


def _single_line(value: str, what: str) -> str:
    if "\n" in value or "\x00" in value:
        raise ValueError(f"{what} must be a single line without NUL bytes")
    return value


class GuestForward(_Spec):
    """``guestfwd`` of user-mode networking: guest TCP to ``guest_addr:guest_port`` runs ``command``.

    QEMU (libslirp) starts ``command`` once per guest connection with the connection as its stdin
    and stdout, so each connection gets its own stream (a chardev target would carry only one).
    """

    guest_addr: str = Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")
    guest_port: int = Field(ge=1, le=65535)
    command: Annotated[str, Field(min_length=1, max_length=4096)]

    @field_validator("command")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return _single_line(value, "a guestfwd command")


class UserNetSpec(_Spec):
    """User-mode (slirp) networking; ``restrict`` cuts the guest off from everything but the
    forwards (``hostfwd`` in, ``guestfwd`` out). ``net``/``dns``: the guest-side network and the
    address slirp answers DNS on (None: QEMU's 10.0.2.0/24 and 10.0.2.3)."""

    id: _ID = "usernet"
    mac: _MAC | None = None
    restrict: bool = False
    hostfwd: tuple[HostForward, ...] = ()
    guestfwd: tuple[GuestForward, ...] = ()
    net: str | None = Field(default=None, pattern=r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")
    dns: str | None = Field(default=None, pattern=r"^\d{1,3}(\.\d{1,3}){3}$")
    ipv6: bool = True  # False: slirp offers the guest no IPv6 at all


class SerialPortSpec(_Spec):
    """A virtio-serial port named ``name`` in the guest; QEMU listens on ``socket_path`` (wait=off)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    socket_path: Path


class VsockSpec(_Spec):
    """vhost-vsock: needs the host's vhost kernel driver and KVM; dropped under TCG."""

    guest_cid: int = Field(ge=3, le=0xFFFFFFFF)


class MemoryBackendSpec(_Spec):
    """Guest RAM in a file. ``share=True`` to snapshot with x-ignore-shared; False to restore privately."""

    path: Path
    share: bool


class QemuMachineSpec(_Spec):
    """Everything one QEMU microVM process is made of."""

    arch: Arch = "x86_64"
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,80}$")
    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_BOOT_ARGS
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(default=128, ge=16, le=1024 * 1024)
    accel: Accelerator = "tcg"
    acpi: bool = False
    drives: tuple[DriveSpec, ...] = ()
    nics: tuple[TapNicSpec, ...] = ()
    user_net: UserNetSpec | None = None
    serial_ports: tuple[SerialPortSpec, ...] = ()
    vsock: VsockSpec | None = None
    rng: bool = True
    memory_backend: MemoryBackendSpec | None = None
    incoming: Literal["defer"] | None = None
    console: bool = True
    qmp_socket: Path | None = None
    # A connected socket QEMU inherits under this number, for the owner's own QMP session: a
    # client of a listening monitor socket can be greeted twice (QEMU 7.2), this one only once.
    qmp_fd: int | None = Field(default=None, ge=0)
    tb_size_mib: int | None = Field(default=32, ge=1)
    no_reboot: bool = True

    @field_validator("cmdline")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return _single_line(value, "kernel command line")

    @model_validator(mode="after")
    def _unique_ids(self) -> QemuMachineSpec:
        ids = [d.id for d in self.drives] + [n.id for n in self.nics]
        if self.user_net is not None:
            ids.append(self.user_net.id)
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"device ids must be unique, repeated: {', '.join(dupes)}")
        names = [p.name for p in self.serial_ports]
        if len(names) != len(set(names)):
            raise ValueError("virtio-serial port names must be unique")
        return self


def escape_qemu_option_value(value: str | Path) -> str:
    """QEMU's ``key=value,...`` syntax: a literal comma in a value is written twice.

    The one escaper for QEMU option values (qemu-system and qemu-storage-daemon alike)."""
    return str(value).replace(",", ",,")


def build_argv(spec: QemuMachineSpec, *, binary: str | None = None) -> list[str]:
    """Return the full argv (binary first) for ``spec``. Pure: no I/O, deterministic."""
    arch = ARCH_PROFILES[spec.arch]
    argv: list[str] = [binary or arch.binary]
    if spec.name:
        argv += ["-name", spec.name]
    argv += ["-nodefaults", "-no-user-config", "-display", "none"]

    machine = [arch.machine]
    if arch.has_acpi_switch:
        machine.append(f"acpi={'on' if spec.acpi else 'off'}")
    if spec.memory_backend is not None:
        machine.append("memory-backend=mem")
    argv += ["-machine", ",".join(machine)]

    if spec.accel == "tcg":
        accel = "tcg" if spec.tb_size_mib is None else f"tcg,tb-size={spec.tb_size_mib}"
        argv += ["-accel", accel, "-cpu", arch.cpu_tcg]
    else:
        argv += ["-accel", "kvm", "-cpu", arch.cpu_kvm]
    argv += ["-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M"]

    if spec.memory_backend is not None:
        mb = spec.memory_backend
        argv += [
            "-object",
            f"memory-backend-file,id=mem,size={spec.memory_mib}M,mem-path={escape_qemu_option_value(mb.path)},"
            f"share={'on' if mb.share else 'off'}",
        ]

    argv += ["-kernel", str(spec.kernel)]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    if spec.cmdline:
        argv += ["-append", spec.cmdline]

    # The console is QEMU's stdout (a pipe the machine reads), so nothing printed early is lost.
    if spec.console:
        argv += ["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]

    if spec.rng:
        argv += [
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-device,rng=rng0",
        ]

    for drive in spec.drives:
        opts = [
            f"id={drive.id}",
            f"file={escape_qemu_option_value(drive.path)}",
            f"format={drive.resolved_format}",
            "if=none",
            f"readonly={'on' if drive.read_only else 'off'}",
            f"cache={drive.cache}",
        ]
        if drive.bps_total is not None:
            opts.append(f"throttling.bps-total={drive.bps_total}")
        if drive.iops_total is not None:
            opts.append(f"throttling.iops-total={drive.iops_total}")
        argv += ["-drive", ",".join(opts), "-device", f"virtio-blk-device,drive={drive.id}"]

    for nic in spec.nics:
        argv += ["-netdev", f"tap,id={nic.id},ifname={nic.tap},script=no,downscript=no"]
        dev = f"virtio-net-device,netdev={nic.id}"
        argv += ["-device", dev if nic.mac is None else f"{dev},mac={nic.mac}"]

    if spec.user_net is not None:
        un = spec.user_net
        opts = [f"user,id={un.id}"]
        if un.restrict:
            opts.append("restrict=on")
        if un.net is not None:
            opts.append(f"net={un.net}")
        if un.dns is not None:
            opts.append(f"dns={un.dns}")
        if not un.ipv6:
            opts.append("ipv6=off")
        opts += [f"hostfwd={f.protocol}:{f.host_addr}:{f.host_port}-:{f.guest_port}" for f in un.hostfwd]
        opts += [
            f"guestfwd=tcp:{f.guest_addr}:{f.guest_port}-cmd:{escape_qemu_option_value(f.command)}"
            for f in un.guestfwd
        ]
        argv += ["-netdev", ",".join(opts)]
        dev = f"virtio-net-device,netdev={un.id}"
        argv += ["-device", dev if un.mac is None else f"{dev},mac={un.mac}"]

    if spec.serial_ports:
        argv += ["-device", "virtio-serial-device,id=vser0"]
        for index, port in enumerate(spec.serial_ports):
            chardev = f"vport{index}"
            argv += [
                "-chardev",
                f"socket,id={chardev},path={escape_qemu_option_value(port.socket_path)},server=on,wait=off",
                "-device",
                f"virtserialport,bus=vser0.0,chardev={chardev},name={port.name}",
            ]

    if spec.vsock is not None and spec.accel == "kvm":
        argv += ["-device", f"vhost-vsock-device,guest-cid={spec.vsock.guest_cid}"]

    if spec.qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmpfd,fd={spec.qmp_fd}", "-mon", "chardev=qmpfd,mode=control"]
    if spec.qmp_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=qmp,path={escape_qemu_option_value(spec.qmp_socket)},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
        ]
    if spec.incoming is not None:
        argv += ["-incoming", spec.incoming]
    if spec.no_reboot:
        argv.append("-no-reboot")
    return argv


# glibc malloc in QEMU: one arena instead of one per thread (vCPU, RCU, I/O workers). Measured on
# restored idle guests: ~0.5 MiB less per QEMU (fewer half-used arenas), no measurable exec slowdown.
QEMU_GLIBC_TUNABLES = "glibc.malloc.arena_max=1"


def build_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment QEMU runs with: ``base`` plus :data:`QEMU_GLIBC_TUNABLES`. Pure.

    Tunables already in ``base["GLIBC_TUNABLES"]`` are kept; ours are appended only for names
    the caller did not set, so an operator's own ``glibc.malloc.arena_max`` wins.
    """
    env = dict(base)
    given = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.partition("=")[0] for t in given}
    ours = [t for t in QEMU_GLIBC_TUNABLES.split(":") if t.partition("=")[0] not in names]
    env["GLIBC_TUNABLES"] = ":".join(given + ours)
    return env


def exec_uri(command: str, path: Path) -> str:
    """A migration ``exec:`` URI running ``command`` on ``path``; the path is shell-quoted.

    QEMU hands the text after ``exec:`` to ``/bin/sh -c``, so the path is quoted with
    :func:`shlex.quote` (spaces and quotes are safe); control characters are rejected.
    """
    text = str(path)
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in text):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"snapshot path contains control characters: {text!r}",
            details={"path": text},
        )
    return f"exec:{command} {shlex.quote(text)}"


# --- Firecracker-style VMConfig -> spec -------------------------------------------------------


class SupportsVMConfig(Protocol):
    """Anything carrying a typed Firecracker config (``smartvm.config.VMConfig``)."""

    @property
    def config(self) -> VMConfigModel: ...


def _has_key(cmdline: str, key: str) -> bool:
    return any(tok == key or tok.startswith(key + "=") for tok in cmdline.split())


def build_kernel_cmdline(
    boot_args: str | None,
    *,
    root_drive: Drive | None = None,
    accel: Accelerator = "tcg",
    tsc_khz: int = 2_600_000,
) -> str:
    """Kernel args as Firecracker would produce them, adapted to QEMU microvm.

    * no ``boot_args`` -> :data:`DEFAULT_BOOT_ARGS`;
    * ``reboot=k`` -> ``reboot=t`` (microvm has no keyboard controller to reset through);
    * a root drive appends ``root=/dev/vda`` (or ``root=PARTUUID=...``) and ``ro``/``rw``, like
      Firecracker; the root drive is always the first disk, so it is ``vda``;
    * under TCG, the TSC/loop calibration hints are appended unless already given.
    """
    tokens = (boot_args if boot_args is not None else DEFAULT_BOOT_ARGS).split()
    tokens = ["reboot=t" if tok == "reboot=k" else tok for tok in tokens]
    cmdline = " ".join(tokens)
    extra: list[str] = []
    if root_drive is not None and not _has_key(cmdline, "root"):
        extra.append(f"root=PARTUUID={root_drive.partuuid}" if root_drive.partuuid else "root=/dev/vda")
        extra.append("ro" if root_drive.is_read_only else "rw")
    if accel == "tcg":
        hz = 250  # lpj is loops per jiffy; the Debian-derived kernels here run at HZ=250
        hints = {
            "tsc_early_khz": f"tsc_early_khz={tsc_khz}",
            "lpj": f"lpj={tsc_khz * 1000 // hz}",
            "no_timer_check": "no_timer_check",
        }
        extra += [hints[key] for key in _TCG_TIMING_KEYS if not _has_key(cmdline, key)]
    return " ".join([cmdline, *extra]).strip()


def with_host_tsc(cmdline: str, tsc_khz: int) -> str:
    """``cmdline`` with the TCG timing hints set from the host's TSC rate, replacing any guess in it.

    Under TCG the guest's TSC *is* the host's TSC, so ``tsc_early_khz`` describes the host, not the
    image: a value baked into an image built elsewhere (2.6 GHz on a 2.1 GHz host) skews the local
    APIC timer calibration, which then fails its check against the PIT ("APIC timer disabled due to
    verification failure"), and the clocksource watchdog marks the TSC unstable. The guest is then
    left with ``refined-jiffies`` and a 250 Hz PIT tick: no tickless idle, ~2.5 % of a host core per
    idle guest instead of ~0.2 %. ``tsc=reliable`` turns that watchdog off for the TSC: it compares
    against PIT jiffies, whose ticks TCG drops when the host is loaded.
    """
    if tsc_khz <= 0:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"tsc_khz must be a positive host TSC rate in kHz, got {tsc_khz}",
            details={"tsc_khz": tsc_khz},
        )
    hz = 250  # lpj is loops per jiffy; the kernels here run at HZ=250
    replaced = {"tsc_early_khz": f"tsc_early_khz={tsc_khz}", "lpj": f"lpj={tsc_khz * 1000 // hz}"}
    tokens = [
        tok for tok in cmdline.split() if tok.split("=", 1)[0] not in replaced and tok != "tsc=reliable"
    ]
    extra = [*replaced.values(), "tsc=reliable"]
    if "no_timer_check" not in tokens:
        extra.append("no_timer_check")
    return " ".join([*tokens, *extra])


def _bucket_rate(size: int | None, refill_time_ms: int | None) -> int | None:
    if not size or not refill_time_ms:
        return None
    return max(1, size * 1000 // refill_time_ms)


def _invalid(message: str, **details: object) -> SmartVMError:
    return SmartVMError(ErrorCode.INVALID_CONFIG, message, details=details)


def spec_from_vmconfig(
    vm_config: SupportsVMConfig | VMConfigModel,
    *,
    accel: Accelerator = "tcg",
    name: str | None = None,
    serial_ports: tuple[SerialPortSpec, ...] = (),
    user_net: UserNetSpec | None = None,
    tsc_khz: int = 2_600_000,
    acpi: bool = False,
) -> QemuMachineSpec:
    """Map a Firecracker-style config to a :class:`QemuMachineSpec`.

    Mapped: boot source, vCPUs, memory, drives (root first; ``Unsafe`` -> ``cache=unsafe``,
    ``Writeback`` -> ``cache=writeback``; bandwidth/ops token buckets -> QEMU throttling), TAP
    interfaces with their MACs, vsock (CID; KVM only), entropy (virtio-rng is always on).
    ``acpi=True`` is for kernels whose virtio drivers are modules (Debian's cloud kernel): they
    find virtio-mmio devices only through ACPI.
    Not mapped (no QEMU equivalent used here): SMT, CPU templates, huge pages, network rate
    limiters, io_engine, balloon, MMDS, logger/metrics.
    """
    model = vm_config if isinstance(vm_config, VMConfigModel) else vm_config.config
    boot = model.boot_source
    if boot is None or not boot.kernel_image_path:
        raise _invalid("boot_source.kernel_image_path is required to boot with QEMU")

    drives_in = list(model.drives)
    roots = [d for d in drives_in if d.is_root_device]
    if len(roots) > 1:
        raise _invalid("only one drive may be the root device", drives=[d.drive_id for d in roots])
    ordered = roots + [d for d in drives_in if not d.is_root_device]
    drives: list[DriveSpec] = []
    for drive in ordered:
        if not drive.drive_id or not drive.path_on_host:
            raise _invalid("every drive needs drive_id and path_on_host", drive_id=drive.drive_id)
        bucket_bw = drive.rate_limiter.bandwidth if drive.rate_limiter else None
        bucket_ops = drive.rate_limiter.ops if drive.rate_limiter else None
        drives.append(
            DriveSpec(
                id=drive.drive_id,
                path=Path(drive.path_on_host),
                read_only=bool(drive.is_read_only),
                cache="unsafe" if drive.cache_type == "Unsafe" else "writeback",
                bps_total=_bucket_rate(bucket_bw.size, bucket_bw.refill_time) if bucket_bw else None,
                iops_total=_bucket_rate(bucket_ops.size, bucket_ops.refill_time) if bucket_ops else None,
            )
        )

    nics = []
    for iface in model.network_interfaces:
        if not iface.iface_id or not iface.host_dev_name:
            raise _invalid(
                "every network interface needs iface_id and host_dev_name", iface_id=iface.iface_id
            )
        nics.append(TapNicSpec(id=iface.iface_id, tap=iface.host_dev_name, mac=iface.guest_mac))

    vsock = None
    if model.vsock is not None and model.vsock.guest_cid is not None:
        vsock = VsockSpec(guest_cid=model.vsock.guest_cid)

    mc = model.machine_config
    return QemuMachineSpec(
        name=name,
        kernel=Path(boot.kernel_image_path),
        initrd=Path(boot.initrd_path) if boot.initrd_path else None,
        cmdline=build_kernel_cmdline(
            boot.boot_args, root_drive=roots[0] if roots else None, accel=accel, tsc_khz=tsc_khz
        ),
        vcpus=mc.vcpu_count,
        memory_mib=mc.mem_size_mib,
        accel=accel,
        acpi=acpi,
        drives=tuple(drives),
        nics=tuple(nics),
        user_net=user_net,
        serial_ports=serial_ports,
        vsock=vsock,
        rng=True,
    )
