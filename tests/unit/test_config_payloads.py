"""Every payload smartvm.config can produce is checked against Firecracker's 1.16.1 OpenAPI spec.

The validator (tests/support/fc_spec.py) is strict: unknown fields are rejected,
as Firecracker itself does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from smartvm.config import (
    LOG_LEVELS,
    ArmRegisterModifier,
    Balloon,
    BootSource,
    CacheType,
    ConfigStep,
    CpuConfig,
    CpuidLeafModifier,
    CpuidRegisterModifier,
    CpuTemplate,
    Drive,
    EntropyDevice,
    HugePages,
    IoEngine,
    LoggerConfig,
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
    TokenBucket,
    VcpuFeatures,
    VMConfig,
    VMConfigModel,
    Vsock,
    boot_configuration_steps,
    instance_start_step,
    observability_steps,
)
from smartvm.errors import SmartVMError
from tests.support.fc_spec import SpecViolation, load_spec, validate_request
from tests.unit.test_config_samples import full_config, minimal_config

# ----------------------------------------------------------------- models vs spec

MODEL_DEFINITIONS: list[tuple[type[BaseModel], str]] = [
    (BootSource, "BootSource"),
    (MachineConfig, "MachineConfiguration"),
    (CpuConfig, "CpuConfig"),
    (CpuidLeafModifier, "CpuidLeafModifier"),
    (CpuidRegisterModifier, "CpuidRegisterModifier"),
    (MsrModifier, "MsrModifier"),
    (ArmRegisterModifier, "ArmRegisterModifier"),
    (VcpuFeatures, "VcpuFeatures"),
    (Drive, "Drive"),
    (Pmem, "Pmem"),
    (NetworkInterface, "NetworkInterface"),
    (Vsock, "Vsock"),
    (Balloon, "Balloon"),
    (MmdsConfig, "MmdsConfig"),
    (MetricsConfig, "Metrics"),
    (LoggerConfig, "Logger"),
    (EntropyDevice, "EntropyDevice"),
    (SerialDevice, "SerialDevice"),
    (MemoryHotplugConfig, "MemoryHotplugConfig"),
    (TokenBucket, "TokenBucket"),
    (RateLimiter, "RateLimiter"),
]


def _spec_names(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


@pytest.mark.parametrize(("model", "definition"), MODEL_DEFINITIONS, ids=[d for _, d in MODEL_DEFINITIONS])
def test_model_fields_are_exactly_the_spec_properties(model: type[BaseModel], definition: str) -> None:
    spec = load_spec()["definitions"][definition]
    assert _spec_names(model) == set(spec["properties"])


def test_top_level_sections_cover_the_full_vm_configuration() -> None:
    spec_sections = set(load_spec()["definitions"]["FullVmConfiguration"]["properties"])
    ours = {name.replace("-", "_") for name in spec_sections}
    # MMDS config is the `mmds` section; serial is configurable but not exported by GET /vm/config.
    ours = (ours - {"mmds_config"}) | {"mmds", "serial", "id"}
    assert set(VMConfigModel.model_fields) == ours


@pytest.mark.parametrize(
    ("values", "definition", "prop"),
    [
        (get_args(CacheType), "Drive", "cache_type"),
        (get_args(IoEngine), "Drive", "io_engine"),
        (get_args(HugePages), "MachineConfiguration", "huge_pages"),
        (get_args(MmdsVersion), "MmdsConfig", "version"),
        (LOG_LEVELS, "Logger", "level"),
        (("eax", "ebx", "ecx", "edx"), "CpuidRegisterModifier", "register"),
    ],
)
def test_enum_values_match_the_spec(values: tuple[str, ...], definition: str, prop: str) -> None:
    assert list(values) == load_spec()["definitions"][definition]["properties"][prop]["enum"]


def test_cpu_template_values_match_the_spec() -> None:
    assert list(get_args(CpuTemplate)) == load_spec()["definitions"]["CpuTemplate"]["enum"]


# -------------------------------------------------------- every section, both configs

SECTION_BUILDERS: list[tuple[str, str, Callable[[VMConfig], dict[str, Any] | None]]] = [
    ("boot_source", "/boot-source", VMConfig.to_boot_source_payload),
    ("machine_config", "/machine-config", VMConfig.to_machine_config_payload),
    ("cpu_config", "/cpu-config", VMConfig.to_cpu_config_payload),
    ("vsock", "/vsock", VMConfig.to_vsock_payload),
    ("balloon", "/balloon", VMConfig.to_balloon_payload),
    ("mmds", "/mmds/config", VMConfig.to_mmds_config_payload),
    ("metrics", "/metrics", VMConfig.to_metrics_payload),
    ("logger", "/logger", VMConfig.to_logger_payload),
    ("entropy", "/entropy", VMConfig.to_entropy_payload),
    ("serial", "/serial", VMConfig.to_serial_payload),
    ("memory_hotplug", "/hotplug/memory", VMConfig.to_memory_hotplug_payload),
]


@pytest.mark.parametrize(
    ("section", "path", "build"), SECTION_BUILDERS, ids=[s for s, _, _ in SECTION_BUILDERS]
)
def test_full_section_payload_is_accepted_by_the_spec_and_carries_every_field(
    section: str, path: str, build: Callable[[VMConfig], dict[str, Any] | None]
) -> None:
    data = full_config()
    payload = build(VMConfig(data))
    assert payload is not None
    validate_request("PUT", path, payload)
    # Nothing lost, nothing renamed: the body is the section exactly as given.
    assert payload == data[section]


@pytest.mark.parametrize(
    ("section", "path", "build"), SECTION_BUILDERS, ids=[s for s, _, _ in SECTION_BUILDERS]
)
def test_minimal_config_payloads(
    section: str, path: str, build: Callable[[VMConfig], dict[str, Any] | None]
) -> None:
    payload = build(VMConfig(minimal_config()))
    if section == "boot_source":
        assert payload == {"kernel_image_path": "/images/vmlinux"}
    elif section == "machine_config":
        # Firecracker's defaults, sent explicitly because the spec requires both fields.
        assert payload == {"vcpu_count": 1, "mem_size_mib": 128}
    else:
        assert payload is None
        return
    validate_request("PUT", path, payload)


# The smallest valid form of every optional section: only the fields the spec requires.
MINIMAL_SECTIONS: list[tuple[str, Any, str, Callable[[VMConfig], dict[str, Any] | None]]] = [
    ("cpu_config", {}, "/cpu-config", VMConfig.to_cpu_config_payload),
    ("vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"}, "/vsock", VMConfig.to_vsock_payload),
    ("balloon", {"amount_mib": 0, "deflate_on_oom": False}, "/balloon", VMConfig.to_balloon_payload),
    ("metrics", {"metrics_path": "/tmp/m"}, "/metrics", VMConfig.to_metrics_payload),
    ("logger", {}, "/logger", VMConfig.to_logger_payload),
    ("entropy", {}, "/entropy", VMConfig.to_entropy_payload),
    ("serial", {}, "/serial", VMConfig.to_serial_payload),
    ("memory_hotplug", {"total_size_mib": 256}, "/hotplug/memory", VMConfig.to_memory_hotplug_payload),
]


@pytest.mark.parametrize(
    ("section", "value", "path", "build"), MINIMAL_SECTIONS, ids=[s for s, *_ in MINIMAL_SECTIONS]
)
def test_minimal_section_payload_is_accepted_by_the_spec(
    section: str, value: Any, path: str, build: Callable[[VMConfig], dict[str, Any] | None]
) -> None:
    data = minimal_config()
    data[section] = copy.deepcopy(value)
    vm_config = VMConfig(data)
    assert vm_config.validate().errors == []
    payload = build(vm_config)
    assert payload == value
    validate_request("PUT", path, payload)


def test_minimal_mmds_drive_pmem_and_interface_payloads_are_accepted() -> None:
    data = minimal_config()
    data["drives"] = [{"drive_id": "root", "path_on_host": "/r.ext4"}]
    data["pmem"] = [{"id": "p0", "path_on_host": "/p.img"}]
    data["network_interfaces"] = [{"iface_id": "eth0", "host_dev_name": "tap0"}]
    data["mmds"] = {"network_interfaces": ["eth0"]}
    vm_config = VMConfig(data)
    assert vm_config.validate().errors == []
    drive = vm_config.to_drive_payload(vm_config.config.drives[0])
    # is_root_device is required by the spec, so it is always sent (default False).
    assert drive == {"drive_id": "root", "path_on_host": "/r.ext4", "is_root_device": False}
    validate_request("PUT", "/drives/root", drive)
    pmem = vm_config.to_pmem_payload(vm_config.config.pmem[0])
    assert pmem == {"id": "p0", "path_on_host": "/p.img"}
    validate_request("PUT", "/pmem/p0", pmem)
    iface = vm_config.to_network_interface_payload(vm_config.config.network_interfaces[0])
    assert iface == {"iface_id": "eth0", "host_dev_name": "tap0"}
    validate_request("PUT", "/network-interfaces/eth0", iface)
    mmds = vm_config.to_mmds_config_payload()
    assert mmds == {"network_interfaces": ["eth0"]}
    validate_request("PUT", "/mmds/config", mmds)


def test_full_device_payloads_are_accepted_by_the_spec() -> None:
    data = full_config()
    vm_config = VMConfig(data)
    for index, drive in enumerate(vm_config.config.drives):
        payload = vm_config.to_drive_payload(drive)
        assert payload == data["drives"][index]
        validate_request("PUT", f"/drives/{drive.drive_id}", payload)
    assert vm_config.to_drive_payloads() == data["drives"]
    for index, pmem in enumerate(vm_config.config.pmem):
        payload = vm_config.to_pmem_payload(pmem)
        assert payload == data["pmem"][index]
        validate_request("PUT", f"/pmem/{pmem.id}", payload)
    for index, iface in enumerate(vm_config.config.network_interfaces):
        payload = vm_config.to_network_interface_payload(iface)
        assert payload == data["network_interfaces"][index]
        validate_request("PUT", f"/network-interfaces/{iface.iface_id}", payload)
    assert vm_config.to_network_interface_payloads() == data["network_interfaces"]


def test_payloads_from_mappings_are_accepted_by_the_spec() -> None:
    vm_config = VMConfig(minimal_config())
    drive = {
        "drive_id": "data",
        "path_on_host": "/d.img",
        "is_read_only": True,
        "rate_limiter": {"ops": {"size": 5, "refill_time": 100}},
    }
    validate_request("PUT", "/drives/data", vm_config.to_drive_payload(drive))
    iface = {
        "iface_id": "eth1",
        "host_dev_name": "tap1",
        "tx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}},
    }
    validate_request("PUT", "/network-interfaces/eth1", vm_config.to_network_interface_payload(iface))
    validate_request("PUT", "/pmem/p1", vm_config.to_pmem_payload({"id": "p1", "path_on_host": "/p"}))


# ------------------------------------------------------------- unknown and unset fields


def test_unknown_fields_never_reach_a_payload() -> None:
    data = full_config()
    data["surprise"] = 1
    data["boot_source"]["kernel_args"] = "x"
    data["machine_config"]["gdb_socket_path"] = "/tmp/gdb"
    data["drives"][0]["rate_limiter"]["bandwidth"]["burst"] = 1
    data["network_interfaces"][0]["allow_mmds_requests"] = True
    data["serial"]["rate_limiter"]["refill"] = 5
    data["cpu_config"]["cpuid_modifiers"][0]["modifiers"][0]["mask"] = "0b1"
    vm_config = VMConfig(data)
    # The strict spec validator rejects any additional property, at any depth.
    for step in _all_steps_without_validation(vm_config):
        validate_request(step.method, step.path, step.body)
    assert "kernel_args" not in vm_config.to_boot_source_payload()
    errors = vm_config.validate().errors
    assert "unknown field 'surprise'" in errors
    assert "unknown field 'boot_source.kernel_args' (did you mean 'kernel_image_path'?)" in errors
    assert "unknown field 'machine_config.gdb_socket_path'" in errors
    assert "unknown field 'drives[0].rate_limiter.bandwidth.burst'" in errors
    assert "unknown field 'network_interfaces[0].allow_mmds_requests'" in errors
    assert "unknown field 'serial.rate_limiter.refill' (did you mean 'refill_time'?)" in errors
    assert "unknown field 'cpu_config.cpuid_modifiers[0].modifiers[0].mask'" in errors
    assert len(errors) == 7


def _all_steps_without_validation(vm_config: VMConfig) -> list[ConfigStep]:
    # boot_configuration_steps refuses invalid configs; rebuild the same bodies directly.
    cfg = vm_config.config
    steps = [
        ConfigStep("boot_source", "PUT", "/boot-source", vm_config.to_boot_source_payload()),
        ConfigStep("machine_config", "PUT", "/machine-config", vm_config.to_machine_config_payload()),
    ]
    for path, build in [(p, b) for _, p, b in SECTION_BUILDERS[2:]]:
        body = build(vm_config)
        assert body is not None
        steps.append(ConfigStep(path, "PUT", path, body))
    steps += [
        ConfigStep("d", "PUT", f"/drives/{d.drive_id}", vm_config.to_drive_payload(d)) for d in cfg.drives
    ]
    steps += [
        ConfigStep("n", "PUT", f"/network-interfaces/{n.iface_id}", vm_config.to_network_interface_payload(n))
        for n in cfg.network_interfaces
    ]
    return steps


def test_unset_optional_fields_are_omitted_not_null() -> None:
    data = minimal_config()
    data["boot_source"]["initrd_path"] = None
    data["machine_config"] = {"vcpu_count": 2, "mem_size_mib": 256, "smt": None}
    data["vsock"] = {"guest_cid": 3, "uds_path": "/v.sock", "vsock_id": None}
    vm_config = VMConfig(data)
    assert vm_config.to_boot_source_payload() == {"kernel_image_path": "/images/vmlinux"}
    assert vm_config.to_machine_config_payload() == {"vcpu_count": 2, "mem_size_mib": 256}
    assert vm_config.to_vsock_payload() == {"guest_cid": 3, "uds_path": "/v.sock"}


def test_logger_level_is_case_insensitive_but_sent_as_the_spec_spells_it() -> None:
    data = minimal_config()
    data["logger"] = {"level": "off"}
    payload = VMConfig(data).to_logger_payload()
    assert payload == {"level": "Off"}
    validate_request("PUT", "/logger", payload)


def test_payload_dicts_are_fresh_copies() -> None:
    vm_config = VMConfig(full_config())
    payload = vm_config.to_mmds_config_payload()
    assert payload is not None
    payload["network_interfaces"].append("eth9")
    drive = vm_config.to_drive_payload(vm_config.config.drives[0])
    drive["rate_limiter"]["bandwidth"]["size"] = 1
    assert vm_config.to_mmds_config_payload() == full_config()["mmds"]
    assert vm_config.to_drive_payload(vm_config.config.drives[0]) == full_config()["drives"][0]


# --------------------------------------------------------------------------- steps


def test_boot_configuration_steps_for_the_full_config_are_ordered_and_spec_valid() -> None:
    steps = boot_configuration_steps(VMConfig(full_config()))
    for step in steps:
        assert step.method == "PUT"
        validate_request(step.method, step.path, step.body)
    assert [step.name for step in steps] == [
        "logger",
        "metrics",
        "machine_config",
        "cpu_config",
        "boot_source",
        "drive:rootfs",
        "drive:vhost_data",
        "pmem:pmem0",
        "network_interface:eth0",
        "vsock",
        "balloon",
        "entropy",
        "serial",
        "memory_hotplug",
        "mmds_config",
    ]
    paths = [step.path for step in steps]
    assert paths[5:9] == ["/drives/rootfs", "/drives/vhost_data", "/pmem/pmem0", "/network-interfaces/eth0"]
    assert paths[-1] == "/mmds/config"


def test_boot_configuration_steps_for_the_minimal_config() -> None:
    steps = boot_configuration_steps(VMConfig(minimal_config()))
    assert [tuple(step) for step in steps] == [
        ("machine_config", "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
        ("boot_source", "PUT", "/boot-source", {"kernel_image_path": "/images/vmlinux"}),
    ]
    for name, method, path, body in steps:
        assert name
        validate_request(method, path, body)


def test_boot_configuration_steps_refuse_an_invalid_config_listing_every_error() -> None:
    data = full_config()
    data["vsock"]["guest_cid"] = 2
    data["machine_config"]["vcpu_count"] = 33
    with pytest.raises(SmartVMError) as info:
        boot_configuration_steps(VMConfig(data))
    assert info.value.code == "INVALID_CONFIG"
    assert info.value.details["errors"] == [
        "machine_config.vcpu_count must be between 1 and 32",
        "vsock.guest_cid must be >= 3",
    ]
    assert "vsock.guest_cid must be >= 3" in info.value.message


def test_observability_and_instance_start_steps_are_spec_valid() -> None:
    steps = observability_steps(VMConfig(full_config()))
    assert [s.name for s in steps] == ["logger", "metrics"]
    start = instance_start_step()
    for step in [*steps, start]:
        validate_request(step.method, step.path, step.body)
    assert tuple(start) == ("instance_start", "PUT", "/actions", {"action_type": "InstanceStart"})
    assert observability_steps(VMConfig(minimal_config())) == []


def test_config_step_is_frozen() -> None:
    step = instance_start_step()
    with pytest.raises(AttributeError):
        step.path = "/elsewhere"  # type: ignore[misc]


def test_spec_validator_would_catch_a_bad_payload() -> None:
    # Guards the tests above against a validator that accepts anything.
    with pytest.raises(SpecViolation):
        validate_request("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128})
    with pytest.raises(SpecViolation):
        validate_request("PUT", "/boot-source", {"boot_args": "x"})
