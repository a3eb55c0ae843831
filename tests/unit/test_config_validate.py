"""VMConfig.validate(): table-driven bad configs, each with the exact, complete list of messages."""

from __future__ import annotations

from typing import Any

import pytest

from smartvm.config import ValidationResult, VMConfig
from smartvm.errors import SmartVMError
from tests.unit.test_config_samples import full_config, minimal_config

K = {"kernel_image_path": "/vmlinux"}
MC = {"vcpu_count": 1, "mem_size_mib": 128}
BUCKET = {"size": 1, "refill_time": 1}
LIKE_MAC = "must be a MAC address like 02:00:00:00:00:01"
OF_01X = "characters of 0, 1 or x"


def _drive(drive_id: str, **extra: Any) -> dict[str, Any]:
    return {"drive_id": drive_id, "path_on_host": f"/{drive_id}.img", **extra}


def _iface(iface_id: str, dev: str, **extra: Any) -> dict[str, Any]:
    return {"iface_id": iface_id, "host_dev_name": dev, **extra}


# (case id, top-level sections replacing those of a minimal valid config, exact expected errors)
BAD_CONFIGS: list[tuple[str, dict[str, Any], list[str]]] = [
    # ---- top level
    ("missing boot_source", {"boot_source": None}, ["boot_source is required"]),
    ("bad vm id", {"id": "my vm"}, ["id 'my vm' must be 1 to 64 characters from [A-Za-z0-9-]"]),
    ("empty vm id", {"id": ""}, ["id '' must be 1 to 64 characters from [A-Za-z0-9-]"]),
    ("vm id too long", {"id": "a" * 65}, [f"id '{'a' * 65}' must be 1 to 64 characters from [A-Za-z0-9-]"]),
    (
        "unknown top-level field, firecracker file spelling",
        {"machine-config": MC},
        ["unknown field 'machine-config' (did you mean 'machine_config'?)"],
    ),
    ("unknown top-level field", {"color": "blue"}, ["unknown field 'color'"]),
    # ---- boot source
    ("no kernel", {"boot_source": {}}, ["boot_source.kernel_image_path is required"]),
    (
        "empty kernel",
        {"boot_source": {"kernel_image_path": " "}},
        ["boot_source.kernel_image_path must not be empty"],
    ),
    (
        "empty initrd",
        {"boot_source": {**K, "initrd_path": ""}},
        ["boot_source.initrd_path must not be empty"],
    ),
    # ---- machine config
    (
        "zero vcpus",
        {"machine_config": {**MC, "vcpu_count": 0}},
        ["machine_config.vcpu_count must be between 1 and 32"],
    ),
    (
        "33 vcpus",
        {"machine_config": {**MC, "vcpu_count": 33}},
        ["machine_config.vcpu_count must be between 1 and 32"],
    ),
    (
        "negative vcpus",
        {"machine_config": {**MC, "vcpu_count": -1}},
        ["machine_config.vcpu_count must be between 1 and 32"],
    ),
    (
        "zero memory",
        {"machine_config": {**MC, "mem_size_mib": 0}},
        ["machine_config.mem_size_mib must be >= 1"],
    ),
    (
        "odd vcpus with smt",
        {"machine_config": {**MC, "vcpu_count": 3, "smt": True}},
        ["machine_config.vcpu_count must be 1 or an even number when smt is true"],
    ),
    (
        "odd memory with 2M huge pages",
        {"machine_config": {"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": "2M"}},
        ["machine_config.mem_size_mib must be a multiple of 2 when huge_pages is 2M"],
    ),
    # ---- drives
    (
        "two root drives",
        {"drives": [_drive("a", is_root_device=True), _drive("b", is_root_device=True)]},
        ["at most one drive may have is_root_device=true"],
    ),
    (
        "drive id with a space",
        {"drives": [_drive("ok"), {"drive_id": "a b", "path_on_host": "/x"}]},
        ["drives[1].drive_id 'a b' must match [A-Za-z0-9_]+"],
    ),
    (
        "drive id with a hyphen",
        {"drives": [_drive("root-fs")]},
        ["drives[0].drive_id 'root-fs' must match [A-Za-z0-9_]+"],
    ),
    (
        "empty drive id",
        {"drives": [{"drive_id": "", "path_on_host": "/x"}]},
        ["drives[0].drive_id '' must match [A-Za-z0-9_]+"],
    ),
    ("missing drive id", {"drives": [{"path_on_host": "/x"}]}, ["drives[0].drive_id is required"]),
    (
        "duplicate drive ids",
        {"drives": [_drive("data"), _drive("root"), _drive("data")]},
        ["drives[2].drive_id 'data' is already used by drives[0]"],
    ),
    (
        "drive without backing",
        {"drives": [{"drive_id": "d"}]},
        ["drives[0].path_on_host is required"],
    ),
    (
        "vhost-user drive with virtio-block fields",
        {
            "drives": [
                {
                    "drive_id": "v",
                    "socket": "/s.sock",
                    "path_on_host": "/x",
                    "is_read_only": True,
                    "io_engine": "Sync",
                }
            ]
        },
        [
            "drives[0].path_on_host must be omitted for a vhost-user-block drive (socket is set)",
            "drives[0].is_read_only must be omitted for a vhost-user-block drive (socket is set)",
            "drives[0].io_engine must be omitted for a vhost-user-block drive (socket is set)",
        ],
    ),
    (
        "rate limiter bucket incomplete and negative",
        {
            "drives": [
                _drive("d", rate_limiter={"bandwidth": {"size": -1}, "ops": {**BUCKET, "one_time_burst": -5}})
            ]
        },
        [
            "drives[0].rate_limiter.bandwidth.refill_time is required",
            "drives[0].rate_limiter.bandwidth.size must be between 0 and 9223372036854775807",
            "drives[0].rate_limiter.ops.one_time_burst must be between 0 and 9223372036854775807",
        ],
    ),
    (
        "rate limiter beyond int64",
        {"drives": [_drive("d", rate_limiter={"ops": {"size": 2**63, "refill_time": 1}})]},
        ["drives[0].rate_limiter.ops.size must be between 0 and 9223372036854775807"],
    ),
    # ---- pmem
    (
        "pmem problems",
        {"pmem": [{"id": "p 0"}, {"id": "p1", "path_on_host": "/p"}, {"id": "p1", "path_on_host": "/q"}]},
        [
            "pmem[0].id 'p 0' must match [A-Za-z0-9_]+",
            "pmem[0].path_on_host is required",
            "pmem[2].id 'p1' is already used by pmem[1]",
        ],
    ),
    (
        "root drive and root pmem",
        {
            "drives": [_drive("r", is_root_device=True)],
            "pmem": [{"id": "p", "path_on_host": "/p", "root_device": True}],
        },
        ["at most one root device may be configured (drives[0] and pmem[0] both are)"],
    ),
    # ---- network interfaces
    (
        "iface id rule and duplicates",
        {"network_interfaces": [_iface("eth.0", "tap0"), _iface("eth1", "tap1"), _iface("eth1", "tap2")]},
        [
            "network_interfaces[0].iface_id 'eth.0' must match [A-Za-z0-9_]+",
            "network_interfaces[2].iface_id 'eth1' is already used by network_interfaces[1]",
        ],
    ),
    (
        "missing iface id and host device",
        {"network_interfaces": [{"guest_mac": "02:00:00:00:00:01"}]},
        ["network_interfaces[0].iface_id is required", "network_interfaces[0].host_dev_name is required"],
    ),
    (
        "host_dev_name too long",
        {"network_interfaces": [_iface("eth0", "tap-0123456789ab")]},
        ["network_interfaces[0].host_dev_name 'tap-0123456789ab' must be at most 15 characters"],
    ),
    (
        "host_dev_name with bad characters",
        {"network_interfaces": [_iface("eth0", "tap 0"), _iface("eth1", "a/b")]},
        [
            "network_interfaces[0].host_dev_name 'tap 0' must not contain '/', ':' or whitespace",
            "network_interfaces[1].host_dev_name 'a/b' must not contain '/', ':' or whitespace",
        ],
    ),
    (
        "host_dev_name empty or dot",
        {"network_interfaces": [_iface("eth0", ""), _iface("eth1", "..")]},
        [
            "network_interfaces[0].host_dev_name '' is not a valid interface name",
            "network_interfaces[1].host_dev_name '..' is not a valid interface name",
        ],
    ),
    (
        "duplicate host device",
        {"network_interfaces": [_iface("eth0", "tap0"), _iface("eth1", "tap0")]},
        ["network_interfaces[1].host_dev_name 'tap0' is already used by network_interfaces[0]"],
    ),
    (
        "malformed MACs",
        {
            "network_interfaces": [
                _iface("a", "t0", guest_mac="02:00:00:00:00"),
                _iface("b", "t1", guest_mac="02-00-00-00-00-01"),
                _iface("c", "t2", guest_mac="02:00:00:00:00:0g"),
            ]
        },
        [
            f"network_interfaces[0].guest_mac '02:00:00:00:00' {LIKE_MAC}",
            f"network_interfaces[1].guest_mac '02-00-00-00-00-01' {LIKE_MAC}",
            f"network_interfaces[2].guest_mac '02:00:00:00:00:0g' {LIKE_MAC}",
        ],
    ),
    (
        "multicast MAC",
        {"network_interfaces": [_iface("a", "t0", guest_mac="01:00:5e:00:00:01")]},
        ["network_interfaces[0].guest_mac '01:00:5e:00:00:01' must be a unicast address (first octet even)"],
    ),
    (
        "duplicate MAC in another case",
        {
            "network_interfaces": [
                _iface("a", "t0", guest_mac="02:AB:00:00:00:01"),
                _iface("b", "t1", guest_mac="02:ab:00:00:00:01"),
            ]
        },
        ["network_interfaces[1].guest_mac '02:ab:00:00:00:01' is already used by network_interfaces[0]"],
    ),
    (
        "mtu out of range",
        {"network_interfaces": [_iface("a", "t0", mtu=67), _iface("b", "t1", mtu=65536)]},
        [
            "network_interfaces[0].mtu must be between 68 and 65535",
            "network_interfaces[1].mtu must be between 68 and 65535",
        ],
    ),
    (
        "iface rate limiters",
        {
            "network_interfaces": [
                _iface(
                    "a",
                    "t0",
                    rx_rate_limiter={"ops": {"size": 1}},
                    tx_rate_limiter={"bandwidth": {"refill_time": 1}},
                )
            ]
        },
        [
            "network_interfaces[0].rx_rate_limiter.ops.refill_time is required",
            "network_interfaces[0].tx_rate_limiter.bandwidth.size is required",
        ],
    ),
    # ---- vsock
    (
        "reserved vsock cid",
        {"vsock": {"guest_cid": 2, "uds_path": "/v.sock"}},
        ["vsock.guest_cid must be >= 3"],
    ),
    ("vsock cid 0", {"vsock": {"guest_cid": 0, "uds_path": "/v.sock"}}, ["vsock.guest_cid must be >= 3"]),
    (
        "vsock cid any",
        {"vsock": {"guest_cid": 2**32 - 1, "uds_path": "/v.sock"}},
        ["vsock.guest_cid must be < 4294967295"],
    ),
    ("vsock missing fields", {"vsock": {}}, ["vsock.guest_cid is required", "vsock.uds_path is required"]),
    (
        "vsock socket path too long",
        {"vsock": {"guest_cid": 3, "uds_path": "/" + "s" * 107}},
        ["vsock.uds_path must be at most 107 bytes (the Unix socket path limit)"],
    ),
    # ---- balloon
    (
        "balloon missing fields",
        {"balloon": {}},
        ["balloon.amount_mib is required", "balloon.deflate_on_oom is required"],
    ),
    (
        "balloon larger than memory",
        {"balloon": {"amount_mib": 129, "deflate_on_oom": True}},
        ["balloon.amount_mib must be <= machine_config.mem_size_mib (128)"],
    ),
    (
        "balloon negative and bad polling interval",
        {"balloon": {"amount_mib": -1, "deflate_on_oom": True, "stats_polling_interval_s": 65536}},
        ["balloon.amount_mib must be >= 0", "balloon.stats_polling_interval_s must be between 0 and 65535"],
    ),
    # ---- mmds
    ("mmds without interfaces", {"mmds": {"version": "V2"}}, ["mmds.network_interfaces is required"]),
    (
        "mmds with an empty interface list",
        {"mmds": {"network_interfaces": []}},
        ["mmds.network_interfaces must name at least one network interface"],
    ),
    (
        "mmds naming an unknown interface",
        {"network_interfaces": [_iface("eth0", "tap0")], "mmds": {"network_interfaces": ["eth0", "eth1"]}},
        ["mmds.network_interfaces[1] 'eth1' is not a configured network interface"],
    ),
    (
        "mmds address not link-local",
        {
            "network_interfaces": [_iface("eth0", "tap0")],
            "mmds": {"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.1"},
        },
        ["mmds.ipv4_address '169.254.0.1' must be a link-local IPv4 address in 169.254.1.0-169.254.254.255"],
    ),
    # ---- metrics, logger, serial, entropy, memory hotplug
    ("metrics without path", {"metrics": {}}, ["metrics.metrics_path is required"]),
    ("logger with empty path", {"logger": {"log_path": ""}}, ["logger.log_path must not be empty"]),
    (
        "serial problems",
        {"serial": {"serial_out_path": "", "rate_limiter": {"size": 1}}},
        ["serial.serial_out_path must not be empty", "serial.rate_limiter.refill_time is required"],
    ),
    (
        "entropy limiter",
        {"entropy": {"rate_limiter": {"bandwidth": {"size": 1, "refill_time": -1}}}},
        ["entropy.rate_limiter.bandwidth.refill_time must be between 0 and 9223372036854775807"],
    ),
    (
        "memory hotplug",
        {"memory_hotplug": {"slot_size_mib": 64, "block_size_mib": 1}},
        [
            "memory_hotplug.total_size_mib is required",
            "memory_hotplug.slot_size_mib must be >= 128",
            "memory_hotplug.block_size_mib must be >= 2",
        ],
    ),
    # ---- cpu config
    (
        "cpu config problems",
        {
            "cpu_config": {
                "kvm_capabilities": ["12a"],
                "cpuid_modifiers": [{"leaf": "0x1", "modifiers": [{"bitmap": "0b101"}]}],
                "msr_modifiers": [{"bitmap": "0b" + "2" * 64}],
                "reg_modifiers": [{"addr": "0x1", "bitmap": "0b" + "1" * 129}],
                "vcpu_features": [{"bitmap": "1" * 32}],
            }
        },
        [
            "cpu_config.kvm_capabilities[0] '12a' must be a number, optionally prefixed by '!'",
            "cpu_config.cpuid_modifiers[0].subleaf is required",
            "cpu_config.cpuid_modifiers[0].flags is required",
            "cpu_config.cpuid_modifiers[0].modifiers[0].register is required",
            f"cpu_config.cpuid_modifiers[0].modifiers[0].bitmap '0b101' must be '0b' followed by 32 {OF_01X}",
            "cpu_config.msr_modifiers[0].addr is required",
            f"cpu_config.msr_modifiers[0].bitmap '0b{'2' * 64}' must be '0b' followed by 64 {OF_01X}",
            f"cpu_config.reg_modifiers[0].bitmap '0b{'1' * 129}' must be '0b' followed by up to 128 {OF_01X}",
            "cpu_config.vcpu_features[0].index is required",
            f"cpu_config.vcpu_features[0].bitmap '{'1' * 32}' must be '0b' followed by 32 {OF_01X}",
        ],
    ),
]


@pytest.mark.parametrize(
    ("sections", "expected"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_gives_exactly_these_errors(sections: dict[str, Any], expected: list[str]) -> None:
    data = {**minimal_config(), **sections}
    result = VMConfig(data).validate()
    assert result.errors == expected
    assert result.valid is False
    assert not result


def test_all_errors_are_collected_at_once() -> None:
    data = {
        "machine_config": {"vcpu_count": 0, "mem_size_mib": 0},
        "drives": [_drive("a", is_root_device=True), _drive("a", is_root_device=True)],
        "network_interfaces": [_iface("eth0", "a-very-long-tap-name", guest_mac="nope")],
        "vsock": {"guest_cid": 1, "uds_path": "/v.sock"},
        "mmds": {"network_interfaces": ["eth9"]},
    }
    assert VMConfig(data).validate().errors == [
        "boot_source is required",
        "machine_config.vcpu_count must be between 1 and 32",
        "machine_config.mem_size_mib must be >= 1",
        "drives[1].drive_id 'a' is already used by drives[0]",
        "at most one drive may have is_root_device=true",
        "network_interfaces[0].host_dev_name 'a-very-long-tap-name' must be at most 15 characters",
        f"network_interfaces[0].guest_mac 'nope' {LIKE_MAC}",
        "vsock.guest_cid must be >= 3",
        "mmds.network_interfaces[0] 'eth9' is not a configured network interface",
    ]


GOOD_EDGES: list[tuple[str, dict[str, Any]]] = [
    ("1 vcpu", {"machine_config": {"vcpu_count": 1, "mem_size_mib": 1}}),
    ("32 vcpus", {"machine_config": {"vcpu_count": 32, "mem_size_mib": 128}}),
    ("1 vcpu with smt", {"machine_config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": True}}),
    ("vsock cid 3", {"vsock": {"guest_cid": 3, "uds_path": "/v.sock"}}),
    ("vsock path at the limit", {"vsock": {"guest_cid": 3, "uds_path": "/" + "s" * 106}}),
    ("15-character tap", {"network_interfaces": [_iface("eth0", "tap-0123456789a")]}),
    ("upper-case MAC", {"network_interfaces": [_iface("eth0", "tap0", guest_mac="02:AB:CD:EF:00:01")]}),
    ("mtu bounds", {"network_interfaces": [_iface("a", "t0", mtu=68), _iface("b", "t1", mtu=65535)]}),
    ("no root drive", {"drives": [_drive("data")]}),
    ("root pmem only", {"pmem": [{"id": "p", "path_on_host": "/p", "root_device": True}]}),
    ("balloon of all memory", {"balloon": {"amount_mib": 128, "deflate_on_oom": False}}),
    (
        "mmds default address range ends",
        {
            "network_interfaces": [_iface("e", "t")],
            "mmds": {"network_interfaces": ["e"], "ipv4_address": "169.254.254.255"},
        },
    ),
    ("vhost-user drive", {"drives": [{"drive_id": "v", "socket": "/s.sock", "is_root_device": True}]}),
    ("vm id at 64 chars", {"id": "a" * 64}),
    (
        "zero-valued buckets",
        {"entropy": {"rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0, "one_time_burst": 0}}}},
    ),
]


@pytest.mark.parametrize("sections", [c[1] for c in GOOD_EDGES], ids=[c[0] for c in GOOD_EDGES])
def test_edge_values_that_firecracker_accepts_validate(sections: dict[str, Any]) -> None:
    result = VMConfig({**minimal_config(), **sections}).validate()
    assert result == ValidationResult(valid=True, errors=[])


def test_ensure_valid_raises_invalid_config_with_every_error() -> None:
    vm_config = VMConfig({"machine_config": {"vcpu_count": 64, "mem_size_mib": 128}})
    with pytest.raises(SmartVMError) as info:
        vm_config.ensure_valid()
    assert info.value.code == "INVALID_CONFIG"
    assert info.value.details["errors"] == [
        "boot_source is required",
        "machine_config.vcpu_count must be between 1 and 32",
    ]
    VMConfig(full_config()).ensure_valid()


def test_boot_source_payload_of_a_config_without_one_is_a_clear_error() -> None:
    with pytest.raises(SmartVMError) as info:
        VMConfig({}).to_boot_source_payload()
    assert info.value.code == "INVALID_CONFIG"
    assert info.value.message == "boot_source is required"
