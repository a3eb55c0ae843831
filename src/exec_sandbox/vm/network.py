"""A sandbox VM's link to its egress gateway: QEMU user networking that reaches nothing else.

Transport (decided and tested, see :mod:`exec_sandbox.egress`): QEMU user networking (libslirp)
with ``restrict=on``. A restricted slirp drops every guest packet except DHCP/TFTP to itself and
TCP to a ``guestfwd`` address; in particular its built-in DNS forwarder at 10.0.2.3 is never
reached (UDP is dropped before the DNS translation), so the host's resolver cannot be used as an
exfiltration channel. The guest's only destination is :data:`EGRESS_ADDRESS`; each of its ports is
a ``guestfwd`` whose ``cmd:`` connector (``socat``, one process per guest connection) carries the
connection to one of the gateway's listeners (Unix sockets in a private directory):

    10.0.2.100:3128  forward proxy (HTTP_PROXY / HTTPS_PROXY, CONNECT)
    10.0.2.100:53    DNS over TCP (resolv.conf ``options use-vc``; there is no UDP at all)
    10.0.2.100:443   transparent TLS, routed by SNI (clients that ignore proxy settings)
    10.0.2.100:80    transparent HTTP, routed by Host

Our DNS answers every usable allowlisted name with :data:`EGRESS_ADDRESS`, so a client that
ignores the proxy still lands on the gateway, which dials the real address itself. The guest has
no default route: a connect() to any IP literal outside the link fails at once (ENETUNREACH).
Port forwards are ``hostfwd`` rules bound to 127.0.0.1 by default. No root, no host firewall.

:func:`build_egress_user_net` is pure; :func:`attach_egress` sends the ``net_config`` frame (after
every boot, restore and fork: the address, MAC and resolver never come from a snapshot) and ties
the gateway's life to the VM's.
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox.errors import SandboxPermanentError
from exec_sandbox.models import PortForward
from exec_sandbox.vm.sandbox_vm import SandboxVm
from smartvm.qemu import GuestForward, HostForward, UserNetSpec

if TYPE_CHECKING:  # not imported at run time: a VM without a network never loads egress
    from exec_sandbox.egress import EgressGateway

__all__ = [
    "EGRESS_ADDRESS",
    "GUEST_ADDRESS",
    "GUEST_NETWORK",
    "PROXY_PORT",
    "attach_egress",
    "build_egress_user_net",
    "concrete_forwards",
    "find_connector",
    "guest_net_env",
]

GUEST_NETWORK = "10.0.2.0/24"
GUEST_ADDRESS = "10.0.2.15"
EGRESS_ADDRESS = "10.0.2.100"
PROXY_PORT = 3128
DNS_PORT = 53
TLS_PORT = 443
HTTP_PORT = 80
GUEST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def find_connector() -> str:
    """The ``socat`` that carries each guest connection to the gateway (an absolute path)."""
    found = shutil.which("socat")
    if found is None:
        raise SandboxPermanentError(
            "networked sandboxes need socat on the host (apt-get install socat)",
            context={"field": "allowed_domains", "missing": "socat"},
        )
    return str(Path(found).absolute())


def _connector(socat: str, address: tuple[str, int] | Path) -> str:
    if isinstance(address, Path):
        return f"{socat} - UNIX-CONNECT:{address}"
    host, port = address
    return f"{socat} - TCP4:{host}:{port}"


def build_egress_user_net(
    gateway: EgressGateway | None, forwards: Iterable[PortForward], *, socat: str | None
) -> UserNetSpec:
    """The restricted user-mode NIC of one sandbox: guestfwd to ``gateway`` (when there is one)
    and hostfwd for ``forwards`` (their host ports already concrete). Pure."""
    guestfwd: list[GuestForward] = []
    if gateway is not None:
        assert socat is not None
        targets: dict[int, tuple[str, int] | Path]
        if gateway.unix_paths:
            paths = gateway.unix_paths
            targets = {PROXY_PORT: paths["forward"], DNS_PORT: paths["dns"], TLS_PORT: paths["tls"],
                       HTTP_PORT: paths["http"]}
        else:
            assert gateway.dns_address and gateway.proxy_addresses
            proxy = gateway.proxy_addresses
            targets = {PROXY_PORT: proxy.forward, DNS_PORT: gateway.dns_address, TLS_PORT: proxy.tls,
                       HTTP_PORT: proxy.http}
        for port, target in targets.items():
            guestfwd.append(GuestForward(guest_addr=EGRESS_ADDRESS, guest_port=port,
                                         command=_connector(socat, target)))
    return UserNetSpec(
        restrict=True,
        ipv6=False,  # the guest kernel has no IPv6; slirp offers none either (defence in depth)
        net=GUEST_NETWORK,
        hostfwd=tuple(HostForward(protocol=f.protocol, host_addr=f.host_addr, host_port=f.host_port,
                                  guest_port=f.guest_port) for f in forwards),
        guestfwd=tuple(guestfwd),
    )


def concrete_forwards(forwards: Iterable[PortForward]) -> tuple[PortForward, ...]:
    """``forwards`` with every ``host_port`` 0 replaced by a port free right now on its address."""
    out = []
    for f in forwards:
        if f.host_port == 0:
            family = socket.AF_INET6 if ipaddress.ip_address(f.host_addr).version == 6 else socket.AF_INET
            kind = socket.SOCK_STREAM if f.protocol == "tcp" else socket.SOCK_DGRAM
            with socket.socket(family, kind) as probe:
                probe.bind((f.host_addr, 0))
                f = f.model_copy(update={"host_port": probe.getsockname()[1]})
        out.append(f)
    return tuple(out)


def guest_net_env(gateway: EgressGateway, *, ca_bundle: bool) -> dict[str, str]:
    """The guest environment: proxy settings (also for pip/npm), secret placeholders, trust store."""
    proxy = f"http://{EGRESS_ADDRESS}:{PROXY_PORT}"
    env = gateway.guest_env(proxy_url=proxy)
    env.update({"NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1",
                "npm_config_proxy": proxy, "npm_config_https_proxy": proxy})
    if ca_bundle:
        for key in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT",
                    "NODE_EXTRA_CA_CERTS", "npm_config_cafile"):
            env[key] = GUEST_CA_BUNDLE
    return env


def _trust_bundle(gateway: EgressGateway, extra_ca_file: Path | None) -> str | None:
    """What the guest trusts: the public roots the host trusts (certifi, when installed), the
    sandbox CA (only when there are secrets) and ``extra_ca_file``. The guest image carries no
    roots of its own."""
    parts: list[str] = []
    try:
        import certifi

        parts.append(Path(certifi.where()).read_text())
    except (ImportError, OSError):
        pass
    if extra_ca_file is not None:
        parts.append(extra_ca_file.read_text())
    if gateway.ca_pem is not None:
        parts.append(gateway.ca_pem.decode())
    return "\n".join(parts) if parts else None


def _random_mac() -> str:
    # locally administered, unicast
    return "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))


async def attach_egress(vm: SandboxVm, gateway: EgressGateway | None, *,
                        extra_ca_file: Path | None = None) -> None:
    """Configure ``vm``'s NIC (fresh MAC) and environment for ``gateway``; the gateway closes with
    the VM from now on. Without a gateway the NIC only carries port forwards."""
    if gateway is not None:
        vm.on_close("close egress gateway", gateway.aclose)
    bundle = _trust_bundle(gateway, extra_ca_file) if gateway is not None else None
    await vm.agent.configure_network(address=GUEST_ADDRESS, prefix=24, nameserver=EGRESS_ADDRESS,
                                     mac=_random_mac(), ca_bundle=bundle)
    if gateway is not None:
        vm.net_env = guest_net_env(gateway, ca_bundle=bundle is not None)
