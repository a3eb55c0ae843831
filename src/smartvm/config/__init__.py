"""Typed microVM configuration that speaks Firecracker's API (v1.16.1).

* :mod:`~smartvm.config.models` - pydantic models, one per spec definition.
* :class:`VMConfig` - owned copy of a config; ``validate()`` and ``to_*_payload()``.
* :func:`boot_configuration_steps` - the ordered pre-boot API requests.
"""

from smartvm.config.models import (
    ArmRegisterModifier,
    Balloon,
    BootSource,
    CacheType,
    CpuConfig,
    CpuidLeafModifier,
    CpuidRegisterModifier,
    CpuTemplate,
    Drive,
    EntropyDevice,
    HugePages,
    IoEngine,
    LoggerConfig,
    LogLevel,
    MachineConfig,
    MemoryHotplugConfig,
    MetricsConfig,
    MmdsConfig,
    MmdsVersion,
    MsrModifier,
    NetworkInterface,
    Pmem,
    RateLimiter,
    SerialDevice,
    SpecModel,
    TokenBucket,
    VcpuFeatures,
    VMConfigModel,
    Vsock,
)
from smartvm.config.payloads import spec_payload
from smartvm.config.steps import (
    ConfigStep,
    boot_configuration_steps,
    instance_start_step,
    observability_steps,
)
from smartvm.config.validation import validate_model
from smartvm.config.vmconfig import ValidationResult, VMConfig, format_validation_error

__all__ = [
    "ArmRegisterModifier",
    "Balloon",
    "BootSource",
    "CacheType",
    "ConfigStep",
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
    "VMConfig",
    "VMConfigModel",
    "ValidationResult",
    "VcpuFeatures",
    "Vsock",
    "boot_configuration_steps",
    "format_validation_error",
    "instance_start_step",
    "observability_steps",
    "spec_payload",
    "validate_model",
]
