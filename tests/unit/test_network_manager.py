"""NetworkManager's pure surface and its argument checks (nothing here touches the host)."""

from __future__ import annotations

import pytest

from smartvm.errors import SmartVMError
from smartvm.network import NetworkManager, TapInfo
from smartvm.network.netlink import HostNetwork


def test_defaults() -> None:
    nm = NetworkManager()
    assert nm.subnet == "172.16.0.0/24"
    assert nm.gateway_ip == "172.16.0.1"
    assert nm.subnet_mask == "255.255.255.0"
    assert nm.prefixlen == 24
    assert nm.bridge_name == "smartvm0"
    assert nm.netns is None
    assert nm.taps == {}
    assert nm.allocated_ips == []


def test_normalised_subnet_properties() -> None:
    nm = NetworkManager(subnet="10.20.30.17/29", bridge_name="svbr1")
    assert nm.subnet == "10.20.30.16/29"
    assert nm.gateway_ip == "10.20.30.17"
    assert nm.subnet_mask == "255.255.255.248"
    assert nm.bridge_name == "svbr1"
    assert [nm.allocate_ip(), nm.allocate_ip()] == ["10.20.30.18", "10.20.30.19"]


def test_allocate_release_reuse_and_exhaustion() -> None:
    nm = NetworkManager(subnet="192.168.100.0/29")
    ips = [nm.allocate_ip() for _ in range(5)]
    assert ips == [f"192.168.100.{n}" for n in range(2, 7)]
    with pytest.raises(SmartVMError) as info:
        nm.allocate_ip()
    assert info.value.code == "IP_EXHAUSTED"
    nm.release_ip("192.168.100.4")
    assert nm.allocated_ips == ["192.168.100.2", "192.168.100.3", "192.168.100.5", "192.168.100.6"]
    assert nm.allocate_ip() == "192.168.100.4"


@pytest.mark.parametrize("ip", ["192.168.100.9", "10.0.0.2", "192.168.100.1", "nonsense"])
def test_release_unknown_ip(ip: str) -> None:
    nm = NetworkManager(subnet="192.168.100.0/24")
    nm.allocate_ip()
    with pytest.raises(SmartVMError) as info:
        nm.release_ip(ip)
    assert info.value.code == "INVALID_IP"


@pytest.mark.parametrize("subnet", ["10.0.0.0/31", "10..0.1/24", "10.0x10.0.1/24", "10.0.0.1 /24", "nope"])
def test_rejects_bad_subnet(subnet: str) -> None:
    with pytest.raises(SmartVMError) as info:
        NetworkManager(subnet=subnet)
    assert info.value.code == "INVALID_SUBNET"


@pytest.mark.parametrize("bridge", ["bad bridge", "", "b" * 16, "br/0"])
def test_rejects_bad_bridge_name(bridge: str) -> None:
    with pytest.raises(SmartVMError) as info:
        NetworkManager(bridge_name=bridge)
    assert info.value.code == "INVALID_INTERFACE_NAME"
    assert "bridge name" in info.value.message


@pytest.mark.parametrize("netns", ["", "a/b", "..", " ns"])
def test_rejects_bad_netns(netns: str) -> None:
    with pytest.raises(SmartVMError) as info:
        NetworkManager(netns=netns)
    assert info.value.code == "INVALID_ARGUMENT"


def test_accepts_netns_name_and_absolute_path() -> None:
    assert (
        NetworkManager(netns="some-namespace-name-longer-than-15").netns
        == "some-namespace-name-longer-than-15"
    )
    assert HostNetwork("/proc/1/ns/net").netns == "/proc/1/ns/net"


def test_mac_tap_name_and_boot_args() -> None:
    nm = NetworkManager()
    assert nm.generate_mac("vm1", "eth0") == nm.generate_mac("vm1", "eth0")
    assert nm.generate_mac("vm1", "eth0") != nm.generate_mac("vm1", "eth1")
    name = nm.generate_tap_name("abcdefgh-1234-5678-90ab-cdef01234567", "eth0")
    assert name.startswith("sv") and len(name) <= 15
    tap = TapInfo(
        tap_name=name,
        guest_ip="172.16.0.2",
        gateway_ip=nm.gateway_ip,
        subnet_mask=nm.subnet_mask,
        mac=nm.generate_mac("vm1", "eth0"),
    )
    assert nm.get_guest_network_boot_args(tap) == "ip=172.16.0.2::172.16.0.1:255.255.255.0::eth0:off"
    with pytest.raises(SmartVMError) as info:
        nm.get_guest_network_boot_args({"tap_name": name})
    assert info.value.code == "INVALID_ARGUMENT"


async def test_host_calls_reject_bad_names_before_any_change() -> None:
    # No netns and no root needed: validation fails before a netlink socket is opened.
    nm = NetworkManager(netns="smartvm-unit-never-created")
    with pytest.raises(SmartVMError) as info:
        await nm.create_tap("", "eth0")
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(SmartVMError) as info:
        await nm.delete_tap("bad tap")
    assert info.value.code == "INVALID_INTERFACE_NAME"
    assert nm.allocated_ips == []


async def test_missing_netns_is_a_typed_error_and_leaves_no_allocation() -> None:
    nm = NetworkManager(netns="smartvm-unit-never-created")
    with pytest.raises(SmartVMError) as info:
        await nm.create_tap("vm1", "eth0")
    assert info.value.code == "NETWORK_SETUP_FAILED"
    assert info.value.details["errno"] == 2
    assert info.value.details["interface"] == "smartvm0"
    assert info.value.details["netns"] == "smartvm-unit-never-created"
    assert nm.allocated_ips == []
    assert nm.taps == {}
    await nm.cleanup()  # nothing was registered: a no-op


async def test_delete_unknown_tap_and_cleanup_without_changes_are_noops() -> None:
    nm = NetworkManager(netns="smartvm-unit-never-created")
    await nm.delete_tap("svnothere")
    await nm.cleanup()
    await nm.cleanup()
    async with nm as same:
        assert same is nm


@pytest.mark.parametrize(("gateway", "prefixlen"), [("10.0.0.256", 24), ("gw", 24), ("10.0.0.1", 33)])
async def test_host_network_rejects_bad_gateway_before_any_change(gateway: str, prefixlen: int) -> None:
    host = HostNetwork("smartvm-unit-never-created")
    with pytest.raises(SmartVMError) as info:
        await host.ensure_bridge("svbr0", gateway, prefixlen)
    assert info.value.code == "INVALID_IP"
    assert host.undo_entries == []
