"""Pure addressing: subnet parsing, the IP pool, MACs, TAP names, TapInfo and ``ip=`` boot args."""

from __future__ import annotations

import ipaddress
import re

import pytest

from smartvm.errors import SmartVMError
from smartvm.network.addressing import (
    IpPool,
    TapInfo,
    build_guest_ip_boot_arg,
    generate_mac,
    generate_tap_name,
    parse_subnet,
    validate_interface_name,
)

# ---------------------------------------------------------------- subnets


@pytest.mark.parametrize(
    ("text", "cidr", "gateway", "first", "last", "mask"),
    [
        ("172.16.0.0/24", "172.16.0.0/24", "172.16.0.1", "172.16.0.2", "172.16.0.254", "255.255.255.0"),
        ("10.20.30.17/29", "10.20.30.16/29", "10.20.30.17", "10.20.30.18", "10.20.30.22", "255.255.255.248"),
        (
            "192.168.100.3/30",
            "192.168.100.0/30",
            "192.168.100.1",
            "192.168.100.2",
            "192.168.100.2",
            "255.255.255.252",
        ),
        ("10.1.2.3/8", "10.0.0.0/8", "10.0.0.1", "10.0.0.2", "10.255.255.254", "255.0.0.0"),
        ("100.64.7.200/22", "100.64.4.0/22", "100.64.4.1", "100.64.4.2", "100.64.7.254", "255.255.252.0"),
    ],
)
def test_parse_subnet_normalises(
    text: str, cidr: str, gateway: str, first: str, last: str, mask: str
) -> None:
    subnet = parse_subnet(text)
    assert subnet.cidr == cidr
    assert str(subnet.gateway) == gateway
    assert str(subnet.first_guest) == first
    assert str(subnet.last_guest) == last
    assert subnet.netmask == mask


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("10..0.1/24", "four decimal octets"),
        ("10.0x10.0.1/24", "four decimal octets"),
        ("10.0.0.1 /24", "four decimal octets"),
        (" 10.0.0.0/24", "four decimal octets"),
        ("10.0.0.0/24\n", "four decimal octets"),
        ("10.0.0.0", "four decimal octets"),
        ("10.0.0/24", "four decimal octets"),
        ("10.0.0.0.0/24", "four decimal octets"),
        ("10.0.0.0/", "four decimal octets"),
        ("10.0.0.0/024", "four decimal octets"),
        ("10.0.0.0/-1", "four decimal octets"),
        ("", "four decimal octets"),
        ("fd00::/64", "four decimal octets"),
        ("10.0.0.٣/24", "four decimal octets"),  # non-ASCII digit
        ("10.0.256.0/24", "greater than 255"),
        ("010.0.0.0/24", "leading zero"),
        ("10.0.00.0/24", "leading zero"),
        ("10.0.0.0/31", "/31"),
        ("10.0.0.0/32", "/32"),
        ("10.0.0.0/7", "/7"),
        ("0.0.0.0/0", "/0"),
        ("10.0.0.0/33", "/33"),
        ("127.0.0.0/24", "loopback"),
        ("224.0.0.0/24", "multicast"),
        ("250.0.0.0/24", "reserved"),
        ("0.1.0.0/16", "0.0.0.0/8"),
    ],
)
def test_parse_subnet_rejects_bad_input(text: str, fragment: str) -> None:
    with pytest.raises(SmartVMError) as info:
        parse_subnet(text)
    assert info.value.code == "INVALID_SUBNET"
    assert fragment in info.value.message
    assert repr(text) in info.value.message
    assert info.value.details["subnet"] == text


@pytest.mark.parametrize("value", [None, 24, b"10.0.0.0/24", ipaddress.IPv4Network("10.0.0.0/24")])
def test_parse_subnet_rejects_non_strings(value: object) -> None:
    with pytest.raises(SmartVMError) as info:
        parse_subnet(value)
    assert info.value.code == "INVALID_SUBNET"
    assert type(value).__name__ in info.value.message


# ---------------------------------------------------------------- IP pool


def test_pool_allocates_sequentially_from_second_host() -> None:
    pool = IpPool(parse_subnet("172.30.0.0/24"))
    assert [pool.allocate() for _ in range(3)] == ["172.30.0.2", "172.30.0.3", "172.30.0.4"]
    assert pool.allocated == ["172.30.0.2", "172.30.0.3", "172.30.0.4"]
    assert pool.available == 253 - 3


def test_pool_reuses_lowest_released_address_first() -> None:
    pool = IpPool(parse_subnet("172.30.0.0/24"))
    ips = [pool.allocate() for _ in range(5)]
    pool.release(ips[3])
    pool.release(ips[1])
    assert pool.allocate() == ips[1]
    assert pool.allocate() == ips[3]
    assert pool.allocate() == "172.30.0.7"
    assert "172.30.0.7" in pool
    assert "172.30.0.200" not in pool
    assert "not-an-ip" not in pool


def test_pool_exhaustion_and_recovery() -> None:
    pool = IpPool(parse_subnet("10.20.30.17/29"))
    ips = [pool.allocate() for _ in range(5)]
    assert ips == [f"10.20.30.{n}" for n in range(18, 23)]
    with pytest.raises(SmartVMError) as info:
        pool.allocate()
    assert info.value.code == "IP_EXHAUSTED"
    assert "10.20.30.16/29" in info.value.message
    assert info.value.retryable is True
    # Exhaustion is not sticky: a released address is handed out again.
    pool.release("10.20.30.20")
    assert pool.allocate() == "10.20.30.20"
    with pytest.raises(SmartVMError):
        pool.allocate()


def test_pool_never_hands_out_network_gateway_or_broadcast() -> None:
    subnet = parse_subnet("192.168.7.0/28")
    pool = IpPool(subnet)
    got = set()
    with pytest.raises(SmartVMError):
        while True:
            got.add(pool.allocate())
    expected = {str(h) for h in subnet.network.hosts()} - {"192.168.7.1"}
    assert got == expected
    assert len(got) == subnet.guest_capacity == 13


@pytest.mark.parametrize(
    ("ip", "fragment"),
    [
        ("172.30.0.9", "not allocated"),  # inside, never allocated
        ("172.30.0.1", "not allocated"),  # the gateway
        ("172.30.0.0", "not allocated"),  # the network address
        ("172.30.1.2", "outside"),
        ("10.0.0.2", "outside"),
        ("172.30.0.2/24", "not a valid IPv4"),
        ("172.30.0.02", "not a valid IPv4"),
        ("", "not a valid IPv4"),
        ("::1", "not a valid IPv4"),
    ],
)
def test_pool_release_rejects_unknown_ips(ip: str, fragment: str) -> None:
    pool = IpPool(parse_subnet("172.30.0.0/24"))
    pool.allocate()
    with pytest.raises(SmartVMError) as info:
        pool.release(ip)
    assert info.value.code == "INVALID_IP"
    assert fragment in info.value.message
    assert pool.allocated == ["172.30.0.2"]


def test_pool_release_twice_is_an_error() -> None:
    pool = IpPool(parse_subnet("172.30.0.0/24"))
    ip = pool.allocate()
    pool.release(ip)
    with pytest.raises(SmartVMError) as info:
        pool.release(ip)
    assert info.value.code == "INVALID_IP"


def test_pool_release_rejects_non_string() -> None:
    pool = IpPool(parse_subnet("172.30.0.0/24"))
    with pytest.raises(SmartVMError) as info:
        pool.release(3)  # type: ignore[arg-type]
    assert info.value.code == "INVALID_IP"


@pytest.mark.parametrize(
    "cidr", ["10.0.0.0/8", "10.99.0.0/16", "172.31.255.0/24", "192.168.0.252/30", "1.2.3.0/29"]
)
def test_pools_of_many_subnets_stay_inside_and_unique(cidr: str) -> None:
    subnet = parse_subnet(cidr)
    pool = IpPool(subnet)
    count = min(subnet.guest_capacity, 300)
    ips = [pool.allocate() for _ in range(count)]
    assert len(set(ips)) == count
    assert ips[0] == str(subnet.network.network_address + 2)
    for ip in ips:
        address = ipaddress.IPv4Address(ip)
        assert address in subnet.network
        assert address not in (
            subnet.gateway,
            subnet.network.network_address,
            subnet.network.broadcast_address,
        )


def test_independent_pools_do_not_share_state() -> None:
    a = IpPool(parse_subnet("10.0.0.0/24"))
    b = IpPool(parse_subnet("10.0.0.0/24"))
    assert a.allocate() == b.allocate() == "10.0.0.2"
    a.release("10.0.0.2")
    with pytest.raises(SmartVMError):
        a.release("10.0.0.2")
    assert b.allocated == ["10.0.0.2"]


# ---------------------------------------------------------------- names and MACs


@pytest.mark.parametrize("name", ["smartvm0", "br-0", "a", "x" * 15, "eth0.100", "Br_1"])
def test_valid_interface_names(name: str) -> None:
    assert validate_interface_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("bad bridge", "may contain only"),
        ("", "must not be empty"),
        ("x" * 16, "at most 15"),
        ("a/b", "may contain only"),
        ("a:b", "may contain only"),
        (".", "may contain only"),
        ("..", "may contain only"),
        ("-br", "may contain only"),
        ("brü", "may contain only"),
        ("br\n", "may contain only"),
        (None, "must be a string"),
        (7, "must be a string"),
    ],
)
def test_invalid_interface_names(name: object, fragment: str) -> None:
    with pytest.raises(SmartVMError) as info:
        validate_interface_name(name, what="bridge name")
    assert info.value.code == "INVALID_INTERFACE_NAME"
    assert "bridge name" in info.value.message
    assert fragment in info.value.message


def test_mac_is_stable_unicast_locally_administered_and_distinct() -> None:
    macs = {generate_mac(f"vm-{i}", iface) for i in range(200) for iface in ("eth0", "eth1")}
    assert len(macs) == 400
    for mac in macs:
        assert re.fullmatch(r"02(:[0-9a-f]{2}){5}", mac)
        first = int(mac[:2], 16)
        assert first & 0x02 and not first & 0x01
    assert generate_mac("vm-1", "eth0") == generate_mac("vm-1", "eth0")
    # Ids are separated, so shifting a character between them changes the result.
    assert generate_mac("ab", "c") != generate_mac("a", "bc")


def test_tap_name_is_stable_short_and_valid() -> None:
    names = {
        generate_tap_name(f"vm-{i}-" + "x" * 40, iface) for i in range(200) for iface in ("eth0", "eth1")
    }
    assert len(names) == 400
    for name in names:
        assert name.startswith("sv")
        assert len(name) <= 15
        assert validate_interface_name(name) == name
    assert generate_tap_name("vm 1/ü", "eth0") == generate_tap_name("vm 1/ü", "eth0")
    assert generate_tap_name("ab", "c") != generate_tap_name("a", "bc")


@pytest.mark.parametrize(("vm_id", "iface_id"), [("", "eth0"), ("vm", ""), (None, "eth0"), ("vm", 0)])
def test_mac_and_tap_name_reject_bad_ids(vm_id: object, iface_id: object) -> None:
    for fn in (generate_mac, generate_tap_name):
        with pytest.raises(SmartVMError) as info:
            fn(vm_id, iface_id)  # type: ignore[arg-type]
        assert info.value.code == "INVALID_ARGUMENT"
        assert ("vm_id" if vm_id in ("", None) else "iface_id") in info.value.message


# ---------------------------------------------------------------- TapInfo and boot args

GOOD_TAP = {
    "tap_name": "svtest0eth0",
    "guest_ip": "172.30.0.2",
    "gateway_ip": "172.30.0.1",
    "subnet_mask": "255.255.255.0",
    "mac": "02:00:00:00:00:01",
}


def test_boot_arg_from_mapping_and_model() -> None:
    tap = TapInfo.coerce(GOOD_TAP)
    assert TapInfo.coerce(tap) is tap
    assert build_guest_ip_boot_arg(tap) == "ip=172.30.0.2::172.30.0.1:255.255.255.0::eth0:off"
    assert build_guest_ip_boot_arg(tap, "eth1") == "ip=172.30.0.2::172.30.0.1:255.255.255.0::eth1:off"


def test_tapinfo_normalises_mac_case() -> None:
    assert TapInfo.coerce({**GOOD_TAP, "mac": "02:AA:BB:CC:DD:EE"}).mac == "02:aa:bb:cc:dd:ee"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"guest_ip": "172.30.0.300"}, "guest_ip"),
        ({"gateway_ip": "gw"}, "gateway_ip"),
        ({"subnet_mask": "255.0.255.0"}, "subnet_mask"),
        ({"mac": "02:00:00:00:00"}, "mac"),
        ({"tap_name": "bad tap"}, "tap_name"),
        ({"tap_name": "x" * 16}, "tap_name"),
        ({"extra": 1}, "extra"),
        ({"guest_ip": None}, "guest_ip"),
    ],
)
def test_tapinfo_rejects_bad_fields(change: dict[str, object], fragment: str) -> None:
    with pytest.raises(SmartVMError) as info:
        TapInfo.coerce({**GOOD_TAP, **change})
    assert info.value.code == "INVALID_ARGUMENT"
    assert fragment in info.value.message


def test_tapinfo_rejects_missing_field_and_non_mapping() -> None:
    missing = dict(GOOD_TAP)
    del missing["gateway_ip"]
    with pytest.raises(SmartVMError) as info:
        TapInfo.coerce(missing)
    assert info.value.code == "INVALID_ARGUMENT"
    assert "gateway_ip" in info.value.message
    with pytest.raises(SmartVMError) as info:
        TapInfo.coerce(["svtap"])  # type: ignore[arg-type]
    assert info.value.code == "INVALID_ARGUMENT"
    assert "list" in info.value.message


def test_boot_arg_rejects_bad_guest_device() -> None:
    with pytest.raises(SmartVMError) as info:
        build_guest_ip_boot_arg(TapInfo.coerce(GOOD_TAP), "eth0:off")
    assert info.value.code == "INVALID_INTERFACE_NAME"
