"""Typed models of everything Firecracker 1.16 configures before boot.

Field names, types and enum values follow the ``definitions`` of Firecracker's
OpenAPI spec (``firecracker-api.yaml``, v1.16.1) exactly, so a model dumps to a
request body Firecracker accepts. The model names map to spec definitions as
noted in each docstring.

What the models enforce, and what they leave to :meth:`VMConfig.validate`:

* Types are strict (``"2"`` is not an integer, ``1`` is not a boolean) and enum
  values must be spelled as in the spec: a config that violates either cannot
  be represented, so building the model fails.
* Everything else (ranges, id rules, required fields, cross-section rules,
  unknown fields) is *not* enforced here. Unknown fields are kept (``extra="allow"``)
  so that validation can name them; fields the spec requires but we cannot
  default are ``None`` until validation reports them missing. This lets callers
  build a config, inspect it and get *all* its problems at once.

Assignments are type-checked too (``validate_assignment``), so code that fills
in e.g. ``host_dev_name`` later cannot store a value of the wrong type.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

__all__ = [
    "LOG_LEVELS",
    "ArmRegisterModifier",
    "Balloon",
    "BootSource",
    "CacheType",
    "CpuConfig",
    "CpuTemplate",
    "CpuidLeafModifier",
    "CpuidRegisterModifier",
    "Drive",
    "EntropyDevice",
    "HugePages",
    "IoEngine",
    "LogLevel",
    "LoggerConfig",
    "MachineConfig",
    "MemoryHotplugConfig",
    "MetricsConfig",
    "MmdsConfig",
    "MmdsVersion",
    "MsrModifier",
    "NetworkInterface",
    "Pmem",
    "RateLimiter",
    "SerialDevice",
    "SpecModel",
    "TokenBucket",
    "VMConfigModel",
    "VcpuFeatures",
    "Vsock",
]

CacheType = Literal["Unsafe", "Writeback"]
IoEngine = Literal["Sync", "Async"]
CpuTemplate = Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]
HugePages = Literal["None", "2M"]
MmdsVersion = Literal["V1", "V2"]
LOG_LEVELS: tuple[str, ...] = ("Error", "Warning", "Info", "Debug", "Trace", "Off")


def _canonical_log_level(value: Any) -> Any:
    # Firecracker matches levels case-insensitively, but the spec's enum (and so
    # any schema check of our payload) only knows the capitalised spelling.
    if isinstance(value, str):
        for level in LOG_LEVELS:
            if value.lower() == level.lower():
                return level
    return value


LogLevel = Annotated[
    Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"], BeforeValidator(_canonical_log_level)
]


class SpecModel(BaseModel):
    """Base of every config model: strict types, unknown fields kept for validation to report."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class TokenBucket(SpecModel):
    """Spec ``TokenBucket``: ``size`` tokens, refilled over ``refill_time`` ms, plus a one-time burst."""

    size: StrictInt | None = None
    refill_time: StrictInt | None = None
    one_time_burst: StrictInt | None = None


class RateLimiter(SpecModel):
    """Spec ``RateLimiter``: independent bytes/s (``bandwidth``) and ops/s (``ops``) buckets."""

    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


class BootSource(SpecModel):
    """Spec ``BootSource`` (``PUT /boot-source``)."""

    kernel_image_path: StrictStr | None = None
    boot_args: StrictStr | None = None
    initrd_path: StrictStr | None = None


class MachineConfig(SpecModel):
    """Spec ``MachineConfiguration`` (``PUT /machine-config``).

    ``vcpu_count`` and ``mem_size_mib`` default to Firecracker's own defaults
    (1 vCPU, 128 MiB) and are always sent, as the spec requires them.
    """

    vcpu_count: StrictInt = 1
    mem_size_mib: StrictInt = 128
    smt: StrictBool | None = None
    track_dirty_pages: StrictBool | None = None
    huge_pages: HugePages | None = None
    cpu_template: CpuTemplate | None = None


class CpuidRegisterModifier(SpecModel):
    """Spec ``CpuidRegisterModifier`` (x86_64). The spec's ``register`` is ``register_`` in Python.

    (``register`` would shadow ``ABCMeta.register`` on the model class.)
    """

    register_: Literal["eax", "ebx", "ecx", "edx"] | None = Field(default=None, alias="register")
    bitmap: StrictStr | None = None


class CpuidLeafModifier(SpecModel):
    """Spec ``CpuidLeafModifier`` (x86_64)."""

    leaf: StrictStr | None = None
    subleaf: StrictStr | None = None
    flags: StrictInt | None = None
    modifiers: list[CpuidRegisterModifier] | None = None


class MsrModifier(SpecModel):
    """Spec ``MsrModifier`` (x86_64)."""

    addr: StrictStr | None = None
    bitmap: StrictStr | None = None


class ArmRegisterModifier(SpecModel):
    """Spec ``ArmRegisterModifier`` (aarch64)."""

    addr: StrictStr | None = None
    bitmap: StrictStr | None = None


class VcpuFeatures(SpecModel):
    """Spec ``VcpuFeatures`` (aarch64)."""

    index: StrictInt | None = None
    bitmap: StrictStr | None = None


class CpuConfig(SpecModel):
    """Spec ``CpuConfig`` (``PUT /cpu-config``): a custom CPU template."""

    kvm_capabilities: list[StrictStr] | None = None
    cpuid_modifiers: list[CpuidLeafModifier] | None = None
    msr_modifiers: list[MsrModifier] | None = None
    reg_modifiers: list[ArmRegisterModifier] | None = None
    vcpu_features: list[VcpuFeatures] | None = None


class Drive(SpecModel):
    """Spec ``Drive`` (``PUT /drives/{drive_id}``).

    A virtio-block drive sets ``path_on_host``; a vhost-user-block drive sets
    ``socket`` instead. ``is_root_device`` is required by the spec; it defaults
    to False here and is always sent.
    """

    drive_id: StrictStr | None = None
    is_root_device: StrictBool = False
    partuuid: StrictStr | None = None
    cache_type: CacheType | None = None
    is_read_only: StrictBool | None = None
    path_on_host: StrictStr | None = None
    rate_limiter: RateLimiter | None = None
    io_engine: IoEngine | None = None
    socket: StrictStr | None = None


class Pmem(SpecModel):
    """Spec ``Pmem`` (``PUT /pmem/{id}``): a virtio-pmem device backed by a host file."""

    id: StrictStr | None = None
    path_on_host: StrictStr | None = None
    root_device: StrictBool | None = None
    read_only: StrictBool | None = None
    rate_limiter: RateLimiter | None = None


class NetworkInterface(SpecModel):
    """Spec ``NetworkInterface`` (``PUT /network-interfaces/{iface_id}``)."""

    iface_id: StrictStr | None = None
    host_dev_name: StrictStr | None = None
    guest_mac: StrictStr | None = None
    mtu: StrictInt | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class Vsock(SpecModel):
    """Spec ``Vsock`` (``PUT /vsock``). ``vsock_id`` is deprecated by Firecracker."""

    guest_cid: StrictInt | None = None
    uds_path: StrictStr | None = None
    vsock_id: StrictStr | None = None


class Balloon(SpecModel):
    """Spec ``Balloon`` (``PUT /balloon``)."""

    amount_mib: StrictInt | None = None
    deflate_on_oom: StrictBool | None = None
    stats_polling_interval_s: StrictInt | None = None
    free_page_hinting: StrictBool | None = None
    free_page_reporting: StrictBool | None = None


class MmdsConfig(SpecModel):
    """Spec ``MmdsConfig`` (``PUT /mmds/config``)."""

    version: MmdsVersion | None = None
    network_interfaces: list[StrictStr] | None = None
    ipv4_address: StrictStr | None = None
    imds_compat: StrictBool | None = None


class MetricsConfig(SpecModel):
    """Spec ``Metrics`` (``PUT /metrics``)."""

    metrics_path: StrictStr | None = None


class LoggerConfig(SpecModel):
    """Spec ``Logger`` (``PUT /logger``). ``level`` is accepted in any case and sent capitalised."""

    level: LogLevel | None = None
    log_path: StrictStr | None = None
    show_level: StrictBool | None = None
    show_log_origin: StrictBool | None = None
    module: StrictStr | None = None


class EntropyDevice(SpecModel):
    """Spec ``EntropyDevice`` (``PUT /entropy``)."""

    rate_limiter: RateLimiter | None = None


class SerialDevice(SpecModel):
    """Spec ``SerialDevice`` (``PUT /serial``). Its ``rate_limiter`` is a single token bucket."""

    serial_out_path: StrictStr | None = None
    rate_limiter: TokenBucket | None = None


class MemoryHotplugConfig(SpecModel):
    """Spec ``MemoryHotplugConfig`` (``PUT /hotplug/memory``): a virtio-mem device."""

    total_size_mib: StrictInt | None = None
    slot_size_mib: StrictInt | None = None
    block_size_mib: StrictInt | None = None


class VMConfigModel(SpecModel):
    """A whole microVM: one optional field per Firecracker pre-boot resource, plus our VM ``id``.

    Section names are the snake_case forms of Firecracker's ``FullVmConfiguration``
    keys, except ``mmds`` (the MMDS *config*, ``PUT /mmds/config``).
    """

    id: StrictStr | None = None
    boot_source: BootSource | None = None
    machine_config: MachineConfig = Field(default_factory=MachineConfig)
    cpu_config: CpuConfig | None = None
    drives: list[Drive] = Field(default_factory=list)
    pmem: list[Pmem] = Field(default_factory=list)
    network_interfaces: list[NetworkInterface] = Field(default_factory=list)
    vsock: Vsock | None = None
    balloon: Balloon | None = None
    mmds: MmdsConfig | None = None
    metrics: MetricsConfig | None = None
    logger: LoggerConfig | None = None
    entropy: EntropyDevice | None = None
    serial: SerialDevice | None = None
    memory_hotplug: MemoryHotplugConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # JSON/TOML configs often spell "not configured" as null; for sections
        # that always exist (machine_config, device lists) that means the default.
        if isinstance(data, dict):
            defaulted = ("machine_config", "drives", "pmem", "network_interfaces")
            return {k: v for k, v in data.items() if not (k in defaulted and v is None)}
        return data
