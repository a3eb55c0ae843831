"""Semantic checks of a :class:`VMConfigModel`, collecting every problem as a readable message.

The rules are Firecracker's own (its API spec plus the checks its API server
and VMM make on the values), so a config that passes here is not refused for
its shape or values; host facts (files exist, SMT is x86-only, KVM features)
are only known when Firecracker applies it. Messages name the offending field
by its path, e.g.
``drives[1].drive_id 'a b' must match [A-Za-z0-9_]+``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from pydantic import BaseModel

from smartvm.config.models import (
    Balloon,
    BootSource,
    CpuConfig,
    Drive,
    LoggerConfig,
    MachineConfig,
    MemoryHotplugConfig,
    MetricsConfig,
    MmdsConfig,
    NetworkInterface,
    Pmem,
    RateLimiter,
    SerialDevice,
    TokenBucket,
    VMConfigModel,
    Vsock,
)

__all__ = [
    "INSTANCE_ID_RE",
    "MAC_RE",
    "MAX_VCPUS",
    "MMDS_IPV4_RE",
    "RESOURCE_ID_RE",
    "unknown_field_errors",
    "validate_model",
]

# Firecracker's API resource ids (drive_id, iface_id, pmem id): ASCII letters, digits, underscore.
RESOURCE_ID_RE = re.compile(r"[A-Za-z0-9_]+")
# Firecracker's --id rule for a microVM: 1-64 letters, digits or hyphens.
INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")
# The spec's ``format`` for MmdsConfig.ipv4_address: link-local, third octet 1-254.
MMDS_IPV4_RE = re.compile(
    r"169\.254\.([1-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-4])"
    r"\.([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])"
)
MAX_VCPUS = 32
_INT64_MAX = 2**63 - 1
_U32_MAX = 2**32 - 1
_IFNAMSIZ = 16  # Linux interface names hold at most IFNAMSIZ - 1 bytes
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_KVM_CAPABILITY_RE = re.compile(r"!?[0-9]+")


class _Checker:
    """Accumulates messages; one instance per validation run."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def add(self, message: str) -> None:
        self.errors.append(message)

    def required(self, path: str, value: object) -> bool:
        if value is None:
            self.add(f"{path} is required")
            return False
        return True

    def non_empty(self, path: str, value: str | None, *, required: bool = False) -> None:
        if value is None:
            if required:
                self.add(f"{path} is required")
        elif not value.strip():
            self.add(f"{path} must not be empty")

    def int_range(self, path: str, value: int | None, low: int, high: int | None = None) -> None:
        if value is None:
            return
        if high is None:
            if value < low:
                self.add(f"{path} must be >= {low}")
        elif not low <= value <= high:
            self.add(f"{path} must be between {low} and {high}")

    def resource_id(self, path: str, value: str | None, seen: dict[str, str]) -> None:
        if not self.required(path, value):
            return
        assert value is not None
        if not RESOURCE_ID_RE.fullmatch(value):
            self.add(f"{path} {value!r} must match {RESOURCE_ID_RE.pattern}")
        owner = path.rsplit(".", 1)[0]
        if value in seen:
            self.add(f"{path} {value!r} is already used by {seen[value]}")
        else:
            seen[value] = owner


def _unknown_fields(model: BaseModel, path: str, checker: _Checker) -> None:
    extra = model.model_extra or {}
    fields = type(model).model_fields
    spec_names = [info.alias or name for name, info in fields.items()]
    for name in extra:
        where = f"{path}.{name}" if path else name
        hint = difflib.get_close_matches(name.replace("-", "_"), spec_names, n=1, cutoff=0.6)
        suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
        checker.add(f"unknown field {where!r}{suffix}")
    for name, info in fields.items():
        value = getattr(model, name)
        spec_name = info.alias or name
        where = f"{path}.{spec_name}" if path else spec_name
        if isinstance(value, BaseModel):
            _unknown_fields(value, where, checker)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    _unknown_fields(item, f"{where}[{index}]", checker)


def unknown_field_errors(model: BaseModel, path: str = "") -> list[str]:
    """One message per field of ``model`` (recursively) that the spec does not define."""
    checker = _Checker()
    _unknown_fields(model, path, checker)
    return checker.errors


def _token_bucket(path: str, bucket: TokenBucket | None, checker: _Checker) -> None:
    if bucket is None:
        return
    for name in ("size", "refill_time"):
        checker.required(f"{path}.{name}", getattr(bucket, name))
    for name in ("size", "refill_time", "one_time_burst"):
        checker.int_range(f"{path}.{name}", getattr(bucket, name), 0, _INT64_MAX)


def _rate_limiter(path: str, limiter: RateLimiter | None, checker: _Checker) -> None:
    if limiter is None:
        return
    _token_bucket(f"{path}.bandwidth", limiter.bandwidth, checker)
    _token_bucket(f"{path}.ops", limiter.ops, checker)


def _boot_source(boot: BootSource | None, checker: _Checker) -> None:
    if not checker.required("boot_source", boot):
        return
    assert boot is not None
    checker.non_empty("boot_source.kernel_image_path", boot.kernel_image_path, required=True)
    checker.non_empty("boot_source.initrd_path", boot.initrd_path)


def _machine_config(machine: MachineConfig, checker: _Checker) -> None:
    checker.int_range("machine_config.vcpu_count", machine.vcpu_count, 1, MAX_VCPUS)
    checker.int_range("machine_config.mem_size_mib", machine.mem_size_mib, 1)
    if machine.smt and 1 < machine.vcpu_count <= MAX_VCPUS and machine.vcpu_count % 2:
        checker.add("machine_config.vcpu_count must be 1 or an even number when smt is true")
    if machine.huge_pages == "2M" and machine.mem_size_mib % 2:
        checker.add("machine_config.mem_size_mib must be a multiple of 2 when huge_pages is 2M")


def _bitmap(path: str, value: str | None, bits: int, *, exact: bool, underscores: bool, c: _Checker) -> None:
    if not c.required(path, value):
        return
    assert value is not None
    digits = value[2:].replace("_", "") if underscores else value[2:]
    count_ok = len(digits) == bits if exact else 1 <= len(digits) <= bits
    if not (value.startswith("0b") and count_ok and set(digits) <= set("01x")):
        size = f"{bits}" if exact else f"up to {bits}"
        c.add(f"{path} {value!r} must be '0b' followed by {size} characters of 0, 1 or x")


def _cpu_config(cpu: CpuConfig | None, c: _Checker) -> None:
    if cpu is None:
        return
    for i, cap in enumerate(cpu.kvm_capabilities or []):
        if not _KVM_CAPABILITY_RE.fullmatch(cap):
            c.add(f"cpu_config.kvm_capabilities[{i}] {cap!r} must be a number, optionally prefixed by '!'")
    for i, leaf in enumerate(cpu.cpuid_modifiers or []):
        path = f"cpu_config.cpuid_modifiers[{i}]"
        for name in ("leaf", "subleaf", "flags", "modifiers"):
            c.required(f"{path}.{name}", getattr(leaf, name))
        for j, reg in enumerate(leaf.modifiers or []):
            c.required(f"{path}.modifiers[{j}].register", reg.register_)
            _bitmap(f"{path}.modifiers[{j}].bitmap", reg.bitmap, 32, exact=True, underscores=False, c=c)
    for i, msr in enumerate(cpu.msr_modifiers or []):
        c.required(f"cpu_config.msr_modifiers[{i}].addr", msr.addr)
        _bitmap(f"cpu_config.msr_modifiers[{i}].bitmap", msr.bitmap, 64, exact=True, underscores=True, c=c)
    for i, arm in enumerate(cpu.reg_modifiers or []):
        c.required(f"cpu_config.reg_modifiers[{i}].addr", arm.addr)
        _bitmap(f"cpu_config.reg_modifiers[{i}].bitmap", arm.bitmap, 128, exact=False, underscores=True, c=c)
    for i, feat in enumerate(cpu.vcpu_features or []):
        c.required(f"cpu_config.vcpu_features[{i}].index", feat.index)
        _bitmap(f"cpu_config.vcpu_features[{i}].bitmap", feat.bitmap, 32, exact=True, underscores=False, c=c)


def _drives(drives: Sequence[Drive], pmem: Sequence[Pmem], c: _Checker) -> None:
    seen: dict[str, str] = {}
    for i, drive in enumerate(drives):
        path = f"drives[{i}]"
        c.resource_id(f"{path}.drive_id", drive.drive_id, seen)
        if drive.socket is None:
            # virtio-block: backed by a host file
            c.non_empty(f"{path}.path_on_host", drive.path_on_host, required=True)
        else:
            c.non_empty(f"{path}.socket", drive.socket)
            for name in ("path_on_host", "is_read_only", "rate_limiter", "io_engine"):
                if getattr(drive, name) is not None:
                    c.add(f"{path}.{name} must be omitted for a vhost-user-block drive (socket is set)")
        _rate_limiter(f"{path}.rate_limiter", drive.rate_limiter, c)

    pmem_seen: dict[str, str] = {}
    for i, dev in enumerate(pmem):
        c.resource_id(f"pmem[{i}].id", dev.id, pmem_seen)
        c.non_empty(f"pmem[{i}].path_on_host", dev.path_on_host, required=True)
        _rate_limiter(f"pmem[{i}].rate_limiter", dev.rate_limiter, c)

    drive_roots = [f"drives[{i}]" for i, d in enumerate(drives) if d.is_root_device]
    pmem_roots = [f"pmem[{i}]" for i, p in enumerate(pmem) if p.root_device]
    if len(drive_roots) > 1:
        c.add("at most one drive may have is_root_device=true")
    if len(pmem_roots) > 1:
        c.add("at most one pmem device may have root_device=true")
    if drive_roots and pmem_roots:
        c.add(f"at most one root device may be configured ({drive_roots[0]} and {pmem_roots[0]} both are)")


def _network_interfaces(ifaces: Sequence[NetworkInterface], c: _Checker) -> None:
    seen_ids: dict[str, str] = {}
    seen_devs: dict[str, str] = {}
    seen_macs: dict[str, str] = {}
    for i, iface in enumerate(ifaces):
        path = f"network_interfaces[{i}]"
        c.resource_id(f"{path}.iface_id", iface.iface_id, seen_ids)
        dev = iface.host_dev_name
        if c.required(f"{path}.host_dev_name", dev):
            assert dev is not None
            if not dev or dev in (".", ".."):
                c.add(f"{path}.host_dev_name {dev!r} is not a valid interface name")
            elif len(dev.encode()) > _IFNAMSIZ - 1:
                c.add(f"{path}.host_dev_name {dev!r} must be at most {_IFNAMSIZ - 1} characters")
            if any(ch == "/" or ch == ":" or ch.isspace() for ch in dev):
                c.add(f"{path}.host_dev_name {dev!r} must not contain '/', ':' or whitespace")
            if dev in seen_devs:
                c.add(f"{path}.host_dev_name {dev!r} is already used by {seen_devs[dev]}")
            else:
                seen_devs[dev] = path
        mac = iface.guest_mac
        if mac is not None:
            if not MAC_RE.fullmatch(mac):
                c.add(f"{path}.guest_mac {mac!r} must be a MAC address like 02:00:00:00:00:01")
            else:
                if int(mac[:2], 16) & 1:
                    c.add(f"{path}.guest_mac {mac!r} must be a unicast address (first octet even)")
                if mac.lower() in seen_macs:
                    c.add(f"{path}.guest_mac {mac!r} is already used by {seen_macs[mac.lower()]}")
                else:
                    seen_macs[mac.lower()] = path
        c.int_range(f"{path}.mtu", iface.mtu, 68, 65535)
        _rate_limiter(f"{path}.rx_rate_limiter", iface.rx_rate_limiter, c)
        _rate_limiter(f"{path}.tx_rate_limiter", iface.tx_rate_limiter, c)


def _vsock(vsock: Vsock | None, c: _Checker) -> None:
    if vsock is None:
        return
    cid = vsock.guest_cid
    if c.required("vsock.guest_cid", cid):
        assert cid is not None
        if cid < 3:
            c.add("vsock.guest_cid must be >= 3")  # 0-2 are the hypervisor, local and host
        elif cid >= _U32_MAX:
            c.add(f"vsock.guest_cid must be < {_U32_MAX}")  # VMADDR_CID_ANY
    path = vsock.uds_path
    c.non_empty("vsock.uds_path", path, required=True)
    if path is not None and len(path.encode()) > _SUN_PATH_MAX:
        c.add(f"vsock.uds_path must be at most {_SUN_PATH_MAX} bytes (the Unix socket path limit)")


def _balloon(balloon: Balloon | None, machine: MachineConfig, c: _Checker) -> None:
    if balloon is None:
        return
    amount = balloon.amount_mib
    if c.required("balloon.amount_mib", amount):
        assert amount is not None
        if amount < 0:
            c.add("balloon.amount_mib must be >= 0")
        elif amount > machine.mem_size_mib:
            c.add(f"balloon.amount_mib must be <= machine_config.mem_size_mib ({machine.mem_size_mib})")
    c.required("balloon.deflate_on_oom", balloon.deflate_on_oom)
    c.int_range("balloon.stats_polling_interval_s", balloon.stats_polling_interval_s, 0, 65535)


def _mmds(mmds: MmdsConfig | None, ifaces: Sequence[NetworkInterface], c: _Checker) -> None:
    if mmds is None:
        return
    names = mmds.network_interfaces
    if c.required("mmds.network_interfaces", names):
        assert names is not None
        if not names:
            c.add("mmds.network_interfaces must name at least one network interface")
        configured = {iface.iface_id for iface in ifaces}
        for i, name in enumerate(names):
            if name not in configured:
                c.add(f"mmds.network_interfaces[{i}] {name!r} is not a configured network interface")
    addr = mmds.ipv4_address
    if addr is not None and not MMDS_IPV4_RE.fullmatch(addr):
        c.add(f"mmds.ipv4_address {addr!r} must be a link-local IPv4 address in 169.254.1.0-169.254.254.255")


def _outputs(
    metrics: MetricsConfig | None, logger: LoggerConfig | None, serial: SerialDevice | None, c: _Checker
) -> None:
    if metrics is not None:
        c.non_empty("metrics.metrics_path", metrics.metrics_path, required=True)
    if logger is not None:
        c.non_empty("logger.log_path", logger.log_path)
        c.non_empty("logger.module", logger.module)
    if serial is not None:
        c.non_empty("serial.serial_out_path", serial.serial_out_path)
        _token_bucket("serial.rate_limiter", serial.rate_limiter, c)


def _memory_hotplug(hotplug: MemoryHotplugConfig | None, c: _Checker) -> None:
    if hotplug is None:
        return
    if c.required("memory_hotplug.total_size_mib", hotplug.total_size_mib):
        c.int_range("memory_hotplug.total_size_mib", hotplug.total_size_mib, 1)
    c.int_range("memory_hotplug.slot_size_mib", hotplug.slot_size_mib, 128)
    c.int_range("memory_hotplug.block_size_mib", hotplug.block_size_mib, 2)


def validate_model(config: VMConfigModel) -> list[str]:
    """Every problem Firecracker would reject ``config`` for, in config order; empty when valid."""
    c = _Checker()
    _unknown_fields(config, "", c)
    if config.id is not None and not INSTANCE_ID_RE.fullmatch(config.id):
        c.add(f"id {config.id!r} must be 1 to 64 characters from [A-Za-z0-9-]")
    _boot_source(config.boot_source, c)
    _machine_config(config.machine_config, c)
    _cpu_config(config.cpu_config, c)
    _drives(config.drives, config.pmem, c)
    _network_interfaces(config.network_interfaces, c)
    _vsock(config.vsock, c)
    _balloon(config.balloon, config.machine_config, c)
    _mmds(config.mmds, config.network_interfaces, c)
    _outputs(config.metrics, config.logger, config.serial, c)
    if config.entropy is not None:
        _rate_limiter("entropy.rate_limiter", config.entropy.rate_limiter, c)
    _memory_hotplug(config.memory_hotplug, c)
    return c.errors
