# ruff: noqa: E501  (copied verbatim from the acceptance file, whose lines are longer)
"""The acceptance file's VMConfig tests, verbatim, run against ``smartvm.config``.

../shared/acceptance/test_seed_smartvm.py imports names from ``smartvm`` that other
parts of the package provide; this copy lets the VMConfig contract be checked on
its own. Only the import line differs.
"""

from __future__ import annotations

import copy

from smartvm.config import VMConfig

SAMPLE_CONFIG: dict = {
    "id": "test-vm-1",
    "boot_source": {
        "kernel_image_path": "/path/to/vmlinux",
        "boot_args": "console=ttyS0 reboot=k panic=1",
    },
    "machine_config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": False},
    "drives": [
        {
            "drive_id": "rootfs",
            "path_on_host": "/path/to/rootfs.ext4",
            "is_root_device": True,
            "is_read_only": False,
            "cache_type": "Unsafe",
        }
    ],
    "network_interfaces": [
        {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01"}
    ],
}


def sample(**overrides) -> dict:
    config = copy.deepcopy(SAMPLE_CONFIG)
    config.update(overrides)
    return config


# ============================================================
# VMConfig
# ============================================================


def test_vmconfig_validate_passes_for_valid_config():
    result = VMConfig(sample()).validate()
    assert result.valid is True
    assert result.errors == []


def test_vmconfig_validate_fails_for_missing_boot_source():
    result = VMConfig({"machine_config": {"vcpu_count": 1, "mem_size_mib": 128}}).validate()
    assert result.valid is False
    assert len(result.errors) > 0


def test_vmconfig_validate_fails_for_zero_vcpus():
    result = VMConfig(
        {"boot_source": {"kernel_image_path": "/vmlinux"}, "machine_config": {"vcpu_count": 0, "mem_size_mib": 128}}
    ).validate()
    assert result.valid is False


def test_vmconfig_validate_fails_for_more_than_32_vcpus():
    result = VMConfig(
        {"boot_source": {"kernel_image_path": "/vmlinux"}, "machine_config": {"vcpu_count": 64, "mem_size_mib": 128}}
    ).validate()
    assert result.valid is False


def test_vmconfig_validate_fails_for_multiple_root_drives():
    result = VMConfig(
        {
            "boot_source": {"kernel_image_path": "/vmlinux"},
            "machine_config": {"vcpu_count": 1, "mem_size_mib": 128},
            "drives": [
                {"drive_id": "rootfs1", "path_on_host": "/rootfs1", "is_root_device": True},
                {"drive_id": "rootfs2", "path_on_host": "/rootfs2", "is_root_device": True},
            ],
        }
    ).validate()
    assert result.valid is False


def test_vmconfig_validate_fails_for_reserved_vsock_cid():
    result = VMConfig(
        {
            "boot_source": {"kernel_image_path": "/vmlinux"},
            "machine_config": {"vcpu_count": 1, "mem_size_mib": 128},
            "vsock": {"guest_cid": 2, "uds_path": "/tmp/vsock.sock"},
        }
    ).validate()
    assert result.valid is False
    assert "vsock.guest_cid must be >= 3" in result.errors


def test_vmconfig_does_not_retain_caller_references():
    config = sample(
        network_interfaces=[{"iface_id": "eth0", "guest_mac": "02:00:00:00:00:01"}],
        mmds={"version": "V2", "network_interfaces": ["eth0"]},
    )
    vm_config = VMConfig(config)
    config["network_interfaces"][0]["guest_mac"] = "02:00:00:00:00:02"
    config["mmds"]["network_interfaces"].append("eth1")
    iface = vm_config.config.network_interfaces[0]
    assert vm_config.to_network_interface_payload(iface)["guest_mac"] == "02:00:00:00:00:01"
    assert vm_config.to_mmds_config_payload()["network_interfaces"] == ["eth0"]


def test_vmconfig_boot_source_payload():
    payload = VMConfig(sample()).to_boot_source_payload()
    assert payload["kernel_image_path"] == "/path/to/vmlinux"
    assert payload["boot_args"] == "console=ttyS0 reboot=k panic=1"
    assert "initrd_path" not in payload


def test_vmconfig_machine_config_payload():
    payload = VMConfig(sample()).to_machine_config_payload()
    assert payload["vcpu_count"] == 2
    assert payload["mem_size_mib"] == 256
    assert payload["smt"] is False


def test_vmconfig_drive_payload():
    vm_config = VMConfig(sample())
    payload = vm_config.to_drive_payload(vm_config.config.drives[0])
    assert payload["drive_id"] == "rootfs"
    assert payload["path_on_host"] == "/path/to/rootfs.ext4"
    assert payload["is_root_device"] is True
    assert payload["is_read_only"] is False
    assert payload["cache_type"] == "Unsafe"


def test_vmconfig_network_interface_payload():
    vm_config = VMConfig(sample())
    payload = vm_config.to_network_interface_payload(vm_config.config.network_interfaces[0])
    assert payload["iface_id"] == "eth0"
    assert payload["host_dev_name"] == "tap0"
    assert payload["guest_mac"] == "02:00:00:00:00:01"


def test_vmconfig_vsock_and_balloon_payloads_are_none_when_absent():
    vm_config = VMConfig(sample())
    assert vm_config.to_vsock_payload() is None
    assert vm_config.to_balloon_payload() is None


def test_vmconfig_balloon_payload():
    payload = VMConfig(
        sample(balloon={"amount_mib": 64, "deflate_on_oom": True, "stats_polling_interval_s": 5})
    ).to_balloon_payload()
    assert payload is not None
    assert payload["amount_mib"] == 64
    assert payload["deflate_on_oom"] is True
    assert payload["stats_polling_interval_s"] == 5


def test_vmconfig_vsock_payload():
    payload = VMConfig(sample(vsock={"guest_cid": 3, "uds_path": "/tmp/vsock.sock"})).to_vsock_payload()
    assert payload is not None
    assert payload["guest_cid"] == 3
    assert payload["uds_path"] == "/tmp/vsock.sock"


def test_vmconfig_mmds_config_payload():
    payload = VMConfig(sample(mmds={"version": "V2", "network_interfaces": ["eth0"]})).to_mmds_config_payload()
    assert payload is not None
    assert payload["version"] == "V2"
    assert payload["network_interfaces"] == ["eth0"]


def test_vmconfig_metrics_payload():
    payload = VMConfig(sample(metrics={"metrics_path": "/tmp/firecracker-metrics.fifo"})).to_metrics_payload()
    assert payload is not None
    assert payload["metrics_path"] == "/tmp/firecracker-metrics.fifo"


def test_vmconfig_drive_payload_includes_rate_limiter():
    vm_config = VMConfig(sample())
    payload = vm_config.to_drive_payload(
        {
            "drive_id": "data",
            "path_on_host": "/path/to/data.ext4",
            "is_root_device": False,
            "rate_limiter": {
                "bandwidth": {"size": 1000, "refill_time": 2000, "one_time_burst": 3000},
                "ops": {"size": 10, "refill_time": 20, "one_time_burst": 30},
            },
        }
    )
    assert payload["rate_limiter"]["bandwidth"] == {"size": 1000, "refill_time": 2000, "one_time_burst": 3000}
    assert payload["rate_limiter"]["ops"] == {"size": 10, "refill_time": 20, "one_time_burst": 30}


def test_vmconfig_logger_payload():
    payload = VMConfig(
        sample(logger={"log_path": "/tmp/fc.log", "level": "Debug", "show_log_origin": True})
    ).to_logger_payload()
    assert payload is not None
    assert payload["log_path"] == "/tmp/fc.log"
    assert payload["level"] == "Debug"
    assert payload["show_log_origin"] is True
