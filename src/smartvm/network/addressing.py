"""Pure host-network addressing: subnets, the guest IP pool, MACs, TAP names, ``ip=`` boot args.

Nothing here touches the host; every function is deterministic and unit-tested. Bad input raises
:class:`~smartvm.errors.SmartVMError` with one of the codes ``INVALID_SUBNET``, ``IP_EXHAUSTED``,
``INVALID_IP``, ``INVALID_INTERFACE_NAME`` or ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from smartvm.errors import ErrorCode, SmartVMError

__all__ = [
    "IFNAMSIZ_MAX",
    "TAP_NAME_PREFIX",
    "IpPool",
    "Subnet",
    "TapInfo",
    "build_guest_ip_boot_arg",
    "generate_mac",
    "generate_tap_name",
    "parse_subnet",
    "validate_interface_name",
]

IFNAMSIZ_MAX = 15
"""Longest Linux interface name (IFNAMSIZ is 16 including the terminating NUL)."""

TAP_NAME_PREFIX = "sv"

# ASCII only: ``\d`` would also accept non-ASCII digits, which ipaddress then rejects with a vaguer message.
_CIDR_RE = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})/([0-9]{1,2})")
# Stricter than the kernel's dev_valid_name (which allows almost any byte but '/', ':' and whitespace):
# names that are safe in shell commands, QEMU option strings and Firecracker's host_dev_name.
_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")

# A guest subnet needs a network address, a gateway (first host), at least one guest and a broadcast.
MIN_PREFIX = 8
MAX_PREFIX = 30

_FORBIDDEN_RANGES: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved (240.0.0.0/4)"),
)


def _subnet_error(subnet: object, reason: str) -> SmartVMError:
    return SmartVMError(
        ErrorCode.INVALID_SUBNET,
        f"invalid subnet {subnet!r}: {reason}",
        details={"subnet": subnet, "reason": reason},
    )


class Subnet(BaseModel):
    """A validated, normalised IPv4 guest subnet. The first host address is the gateway (the bridge)."""

    model_config = ConfigDict(frozen=True)

    network: ipaddress.IPv4Network

    @property
    def cidr(self) -> str:
        return str(self.network)

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def first_guest(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 2

    @property
    def last_guest(self) -> ipaddress.IPv4Address:
        return self.network.broadcast_address - 1

    @property
    def netmask(self) -> str:
        return str(self.network.netmask)

    @property
    def guest_capacity(self) -> int:
        return int(self.last_guest) - int(self.first_guest) + 1


def parse_subnet(subnet: object) -> Subnet:
    """Parse ``"a.b.c.d/len"`` strictly and normalise it to its network address.

    ``"10.20.30.17/29"`` becomes ``10.20.30.16/29`` (the host bits are a common slip, not an error).
    Rejected: anything but four plain decimal octets and a prefix (no hex, no leading zeros, no spaces),
    prefixes outside /8../30, and loopback, multicast, reserved and 0.0.0.0/8 ranges.
    """
    if not isinstance(subnet, str):
        raise _subnet_error(subnet, f"expected a string like '172.16.0.0/24', got {type(subnet).__name__}")
    match = _CIDR_RE.fullmatch(subnet)
    if match is None:
        raise _subnet_error(subnet, "expected four decimal octets and a prefix length, like '172.16.0.0/24'")
    *octets, prefix = match.groups()
    for octet in octets:
        if len(octet) > 1 and octet.startswith("0"):
            raise _subnet_error(subnet, f"octet {octet!r} has a leading zero (ambiguous: octal or decimal?)")
        if int(octet) > 255:
            raise _subnet_error(subnet, f"octet {octet!r} is greater than 255")
    prefixlen = int(prefix)
    if not MIN_PREFIX <= prefixlen <= MAX_PREFIX:
        raise _subnet_error(
            subnet,
            f"prefix length /{prefixlen} is outside /{MIN_PREFIX}../{MAX_PREFIX} "
            "(a subnet needs room for a network address, a gateway, a guest and a broadcast)",
        )
    network = ipaddress.IPv4Network(f"{'.'.join(octets)}/{prefixlen}", strict=False)
    for forbidden, label in _FORBIDDEN_RANGES:
        if network.overlaps(forbidden):
            raise _subnet_error(subnet, f"overlaps the {label} range")
    return Subnet(network=network)


def _parse_ipv4(ip: object, *, what: str = "IP address") -> ipaddress.IPv4Address:
    if not isinstance(ip, str):
        raise SmartVMError(
            ErrorCode.INVALID_IP, f"{what} must be a string, got {type(ip).__name__}", details={"ip": ip}
        )
    try:
        return ipaddress.IPv4Address(ip)
    except ValueError as exc:
        raise SmartVMError(
            ErrorCode.INVALID_IP, f"{what} {ip!r} is not a valid IPv4 address", details={"ip": ip}
        ) from exc


class IpPool:
    """Guest addresses of one subnet: lowest free address first, released addresses are reused.

    Memory stays proportional to the number of addresses handed out, not to the subnet size: a
    high-water mark plus a min-heap of released addresses below it.
    """

    __slots__ = ("_allocated", "_free", "_next", "_subnet")

    def __init__(self, subnet: Subnet) -> None:
        self._subnet = subnet
        self._next = int(subnet.first_guest)
        self._free: list[int] = []
        self._allocated: set[int] = set()

    @property
    def subnet(self) -> Subnet:
        return self._subnet

    @property
    def allocated(self) -> list[str]:
        """Addresses currently handed out, in ascending order."""
        return [str(ipaddress.IPv4Address(ip)) for ip in sorted(self._allocated)]

    @property
    def available(self) -> int:
        return self._subnet.guest_capacity - len(self._allocated)

    def allocate(self) -> str:
        if self._free:
            ip = heapq.heappop(self._free)
        elif self._next <= int(self._subnet.last_guest):
            ip = self._next
            self._next += 1
        else:
            raise SmartVMError(
                ErrorCode.IP_EXHAUSTED,
                f"no free guest IP left in {self._subnet.cidr} "
                f"({self._subnet.guest_capacity} addresses, all allocated)",
                details={"subnet": self._subnet.cidr, "capacity": self._subnet.guest_capacity},
                retryable=True,
            )
        self._allocated.add(ip)
        return str(ipaddress.IPv4Address(ip))

    def release(self, ip: str) -> None:
        address = _parse_ipv4(ip)
        if address not in self._subnet.network:
            raise SmartVMError(
                ErrorCode.INVALID_IP,
                f"IP {ip!r} is outside subnet {self._subnet.cidr}",
                details={"ip": ip, "subnet": self._subnet.cidr},
            )
        value = int(address)
        if value not in self._allocated:
            raise SmartVMError(
                ErrorCode.INVALID_IP,
                f"IP {ip!r} is not allocated in {self._subnet.cidr}",
                details={"ip": ip, "subnet": self._subnet.cidr},
            )
        self._allocated.remove(value)
        heapq.heappush(self._free, value)

    def __contains__(self, ip: object) -> bool:
        try:
            return int(_parse_ipv4(ip)) in self._allocated
        except SmartVMError:
            return False


def validate_interface_name(name: object, *, what: str = "interface name") -> str:
    """Return ``name`` if it is a usable Linux interface name, else raise ``INVALID_INTERFACE_NAME``."""

    def invalid(reason: str) -> SmartVMError:
        return SmartVMError(
            ErrorCode.INVALID_INTERFACE_NAME,
            f"invalid {what} {name!r}: {reason}",
            details={"name": name, "reason": reason},
        )

    if not isinstance(name, str):
        raise invalid(f"must be a string, got {type(name).__name__}")
    if not name:
        raise invalid("must not be empty")
    if len(name) > IFNAMSIZ_MAX:
        raise invalid(f"is {len(name)} characters long; Linux allows at most {IFNAMSIZ_MAX}")
    if not _IFNAME_RE.fullmatch(name):
        raise invalid(
            "may contain only ASCII letters, digits, '_', '.' and '-', and must start with a letter or digit"
        )
    return name


def _digest(vm_id: object, iface_id: object) -> bytes:
    for label, value in (("vm_id", vm_id), ("iface_id", iface_id)):
        if not isinstance(value, str) or not value:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"{label} must be a non-empty string, got {value!r}",
                details={label: value},
            )
    # NUL cannot appear in either id on the command line, so ("a", "bc") and ("ab", "c") never collide.
    return hashlib.sha256(f"{vm_id}\0{iface_id}".encode()).digest()


def generate_mac(vm_id: str, iface_id: str) -> str:
    """A stable MAC for (vm, interface): locally administered, unicast (first octet ``02``), lower case."""
    digest = _digest(vm_id, iface_id)
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def generate_tap_name(vm_id: str, iface_id: str) -> str:
    """A stable host TAP name for (vm, interface): ``sv`` + 12 hex digits (14 chars, under IFNAMSIZ).

    A hash rather than the ids themselves because VM ids are longer than 15 characters and may hold
    characters interface names cannot; 48 bits make collisions between live VMs negligible.
    """
    return TAP_NAME_PREFIX + _digest(vm_id, iface_id).hex()[:12]


class TapInfo(BaseModel):
    """What a guest needs to know about its host TAP: the name, its own address, gateway, mask and MAC."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tap_name: str
    guest_ip: str
    gateway_ip: str
    subnet_mask: str
    mac: str

    @field_validator("tap_name")
    @classmethod
    def _check_tap_name(cls, value: str) -> str:
        try:
            return validate_interface_name(value, what="TAP name")
        except SmartVMError as exc:
            raise ValueError(exc.message) from None

    @field_validator("guest_ip", "gateway_ip")
    @classmethod
    def _check_ip(cls, value: str) -> str:
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not a valid IPv4 address") from None

    @field_validator("subnet_mask")
    @classmethod
    def _check_mask(cls, value: str) -> str:
        try:
            network = ipaddress.IPv4Network(f"0.0.0.0/{value}")
        except ValueError:
            raise ValueError(f"{value!r} is not a valid IPv4 netmask") from None
        return str(network.netmask)

    @field_validator("mac")
    @classmethod
    def _check_mac(cls, value: str) -> str:
        lowered = value.lower()
        if not _MAC_RE.fullmatch(lowered):
            raise ValueError(f"{value!r} is not a MAC address like '02:00:00:00:00:01'")
        return lowered

    @classmethod
    def coerce(cls, tap: TapInfo | Mapping[str, Any]) -> TapInfo:
        """Accept a TapInfo or a plain mapping; bad input raises ``INVALID_ARGUMENT`` naming the field."""
        if isinstance(tap, TapInfo):
            return tap
        if not isinstance(tap, Mapping):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"TAP info must be a TapInfo or a mapping, got {type(tap).__name__}",
            )
        try:
            return cls.model_validate(dict(tap))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
            )
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"invalid TAP info: {problems}", details={"errors": problems}
            ) from exc


def build_guest_ip_boot_arg(tap: TapInfo, guest_device: str = "eth0") -> str:
    """The kernel's static ``ip=`` parameter (Documentation/admin-guide/nfs/nfsroot.rst):

    ``ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>``
    """
    validate_interface_name(guest_device, what="guest device name")
    return f"ip={tap.guest_ip}::{tap.gateway_ip}:{tap.subnet_mask}::{guest_device}:off"
