"""Host networking for microVMs: pure addressing (subnet, IPs, MACs, TAP names) and netlink side effects."""

from smartvm.network.addressing import (
    IpPool,
    Subnet,
    TapInfo,
    build_guest_ip_boot_arg,
    generate_mac,
    generate_tap_name,
    parse_subnet,
    validate_interface_name,
)
from smartvm.network.manager import DEFAULT_BRIDGE_NAME, DEFAULT_SUBNET, NetworkManager
from smartvm.network.netlink import HostNetwork

__all__ = [
    "DEFAULT_BRIDGE_NAME",
    "DEFAULT_SUBNET",
    "HostNetwork",
    "IpPool",
    "NetworkManager",
    "Subnet",
    "TapInfo",
    "build_guest_ip_boot_arg",
    "generate_mac",
    "generate_tap_name",
    "parse_subnet",
    "validate_interface_name",
]
