"""``net_config``: bring the guest's NIC up as the host says (address, MAC, resolver, trust store).

The host sends this frame after every boot, restore and fork of a networked sandbox, so the
address, MAC and DNS setup never come from the kernel command line or a snapshot. The agent is
root; user code (another uid) cannot change any of it. Only ioctls and file writes: no
``ip``/``ifconfig`` process per boot under TCG.

The boundary itself is not here: the host's QEMU user networking is ``restrict=on`` and carries
guest TCP only to the sandbox's own egress gateway, whatever the guest configures.
"""

from __future__ import annotations

import os

from .core import AgentCore
from .wire import RequestError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .wire import Msg

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFHWADDR = 0x8924
IFF_UP = 0x1
ARPHRD_ETHER = 1
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MAX_CA_BYTES = 2 * 1024 * 1024


def _nic() -> str:
    names = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
    if not names:
        raise RequestError("no_nic", "the guest has no network interface")
    return names[0]


def _ifreq(name: str, payload: bytes) -> bytes:
    return name.encode()[:15].ljust(16, b"\0") + payload.ljust(24, b"\0")


def _sockaddr_in(addr: str) -> bytes:
    import socket

    return socket.AF_INET.to_bytes(2, "little") + b"\0\0" + socket.inet_aton(addr)


def _set_flags(fd: int, name: str, up: bool) -> None:
    import fcntl

    flags = int.from_bytes(fcntl.ioctl(fd, SIOCGIFFLAGS, _ifreq(name, b""))[16:18], "little")
    flags = flags | IFF_UP if up else flags & ~IFF_UP
    fcntl.ioctl(fd, SIOCSIFFLAGS, _ifreq(name, flags.to_bytes(2, "little")))


def configure_nic(address: str, prefix: int, mac: str | None) -> str:
    """Address + netmask (+ MAC) on the first non-loopback NIC, then up. No default route: only the
    link's own network exists, so a connect() anywhere else fails at once (ENETUNREACH)."""
    import fcntl
    import socket

    name = _nic()
    mask = socket.inet_ntoa(((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF).to_bytes(4, "big"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fd = sock.fileno()
        if mac:
            _set_flags(fd, name, False)  # the MAC can only change while the link is down
            raw = bytes(int(part, 16) for part in mac.split(":"))
            fcntl.ioctl(fd, SIOCSIFHWADDR, _ifreq(name, ARPHRD_ETHER.to_bytes(2, "little") + raw))
        fcntl.ioctl(fd, SIOCSIFADDR, _ifreq(name, _sockaddr_in(address)))
        fcntl.ioctl(fd, SIOCSIFNETMASK, _ifreq(name, _sockaddr_in(mask)))
        _set_flags(fd, name, True)
    return name


def _write(path: str, text: str, mode: int = 0o644) -> None:
    tmp = path + ".sbx-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _str(msg: Msg, key: str, limit: int = 64) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not value or len(value) > limit or "\n" in value:
        raise RequestError("invalid_request", f"net_config: {key} must be a short string")
    return value


class NetOps(AgentCore):
    def op_net_config(self, req_id: str, msg: Msg) -> None:
        address = _str(msg, "address")
        prefix = msg.get("prefix")
        if not isinstance(prefix, int) or not 8 <= prefix <= 30:
            raise RequestError("invalid_request", "net_config: prefix must be 8..30")
        mac = msg.get("mac")
        if mac is not None:
            mac = _str(msg, "mac", 17)
        nameserver = _str(msg, "nameserver")
        ca = msg.get("ca_bundle")
        if ca is not None and (not isinstance(ca, str) or len(ca) > MAX_CA_BYTES):
            raise RequestError("invalid_request", "net_config: ca_bundle must be PEM text")
        import socket

        try:
            socket.inet_aton(address)
            socket.inet_aton(nameserver)
            name = configure_nic(address, prefix, mac)
        except (OSError, ValueError) as exc:
            raise RequestError("net_config_failed", f"cannot configure the NIC: {exc}") from None
        # use-vc: glibc asks over TCP, which is all the sandbox's link carries (no UDP at all).
        _write("/etc/resolv.conf", f"nameserver {nameserver}\noptions use-vc attempts:1 timeout:5\n")
        if ca is not None:
            os.makedirs("/etc/ssl/certs", mode=0o755, exist_ok=True)
            _write(CA_BUNDLE, ca)
        self.send({"type": "net_result", "id": req_id, "interface": name})
