"""Sample configs shared by the config tests (one with every field set, one minimal), and their checks."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from smartvm.config import VMConfig

__all__ = ["full_config", "minimal_config"]


def _bucket(base: int) -> dict[str, int]:
    return {"size": base, "refill_time": base * 2, "one_time_burst": base * 3}


def _limiter(base: int) -> dict[str, Any]:
    return {"bandwidth": _bucket(base), "ops": _bucket(base + 1)}


_FULL: dict[str, Any] = {
    "id": "full-vm-1",
    "boot_source": {
        "kernel_image_path": "/images/vmlinux",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
        "initrd_path": "/images/initrd.img",
    },
    "machine_config": {
        "vcpu_count": 2,
        "mem_size_mib": 512,
        "smt": True,
        "track_dirty_pages": True,
        "huge_pages": "2M",
        "cpu_template": "T2S",
    },
    "cpu_config": {
        "kvm_capabilities": ["121", "!122"],
        "cpuid_modifiers": [
            {
                "leaf": "0x1",
                "subleaf": "0x0",
                "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0b" + "x" * 31 + "0"}],
            }
        ],
        "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "0" * 32 + "_" + "x" * 32}],
        "reg_modifiers": [{"addr": "0x603000000013c020", "bitmap": "0b" + "x" * 60 + "0001"}],
        "vcpu_features": [{"index": 0, "bitmap": "0b" + "x" * 26 + "1" + "x" * 5}],
    },
    "drives": [
        {
            "drive_id": "rootfs",
            "is_root_device": True,
            "partuuid": "0eaa91a0-01",
            "cache_type": "Writeback",
            "is_read_only": False,
            "path_on_host": "/images/rootfs.ext4",
            "rate_limiter": _limiter(1000),
            "io_engine": "Async",
        },
        {
            "drive_id": "vhost_data",
            "is_root_device": False,
            "cache_type": "Unsafe",
            "socket": "/run/vhost-user-blk.sock",
        },
    ],
    "pmem": [
        {
            "id": "pmem0",
            "path_on_host": "/images/pmem.img",
            "root_device": False,
            "read_only": True,
            "rate_limiter": _limiter(50),
        }
    ],
    "network_interfaces": [
        {
            "iface_id": "eth0",
            "host_dev_name": "svfull0eth0",
            "guest_mac": "02:fc:00:00:00:01",
            "mtu": 1500,
            "rx_rate_limiter": _limiter(10),
            "tx_rate_limiter": _limiter(20),
        }
    ],
    "vsock": {"guest_cid": 3, "uds_path": "/tmp/full-vm-1.vsock", "vsock_id": "vsock0"},
    "balloon": {
        "amount_mib": 64,
        "deflate_on_oom": True,
        "stats_polling_interval_s": 5,
        "free_page_hinting": True,
        "free_page_reporting": True,
    },
    "mmds": {
        "version": "V2",
        "network_interfaces": ["eth0"],
        "ipv4_address": "169.254.170.2",
        "imds_compat": True,
    },
    "metrics": {"metrics_path": "/tmp/full-vm-1.metrics"},
    "logger": {
        "level": "Debug",
        "log_path": "/tmp/full-vm-1.log",
        "show_level": True,
        "show_log_origin": True,
        "module": "api_server::request",
    },
    "entropy": {"rate_limiter": _limiter(30)},
    "serial": {"serial_out_path": "/tmp/full-vm-1.serial", "rate_limiter": _bucket(40)},
    "memory_hotplug": {"total_size_mib": 1024, "slot_size_mib": 128, "block_size_mib": 2},
}

_MINIMAL: dict[str, Any] = {"boot_source": {"kernel_image_path": "/images/vmlinux"}}


def full_config() -> dict[str, Any]:
    """Every field of every section set (a valid config, though no real host has all these features)."""
    return copy.deepcopy(_FULL)


def minimal_config() -> dict[str, Any]:
    """The least a valid config needs: a kernel."""
    return copy.deepcopy(_MINIMAL)


def _unset_fields(model: BaseModel, path: str) -> list[str]:
    missing = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        where = f"{path}.{name}" if path else name
        if value is None:
            missing.append(where)
        elif isinstance(value, BaseModel):
            missing += _unset_fields(value, where)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    missing += _unset_fields(item, f"{where}[{index}]")
    return missing


def test_full_config_sets_every_field_of_every_model() -> None:
    # The payload tests rely on this sample exercising every field the models declare.
    config = VMConfig(full_config()).config
    # A drive is either virtio-block (path_on_host) or vhost-user-block (socket), never both.
    assert _unset_fields(config, "") == [
        "drives[0].socket",
        "drives[1].partuuid",
        "drives[1].is_read_only",
        "drives[1].path_on_host",
        "drives[1].rate_limiter",
        "drives[1].io_engine",
    ]


def test_full_and_minimal_configs_are_valid() -> None:
    for sample in (full_config(), minimal_config()):
        result = VMConfig(sample).validate()
        assert result.errors == []
        assert result.valid is True
