"""Network egress for sandboxes, host side: allowlist policy, our DNS, the egress proxy, secrets.

Wired to VMs by :mod:`exec_sandbox.vm.network` (the link, the ``net_config`` frame) and
:mod:`exec_sandbox.sandbox.network` (``SchedulerConfig``/``run()``/``session()`` -> one
:class:`EgressPolicy`, one started :class:`EgressGateway` per sandbox, closed with its VM). Modules:

- :mod:`.policy`      pure, validated :class:`EgressPolicy` (names, CIDRs, ports, overrides,
  ``allow_private``, :class:`Secret` s, :class:`EgressLimits`), address classification,
  :class:`SecretPlaceholders` (``sbx-secret-<random>``; the real values never leave the host).
- :mod:`.resolver`    :class:`EgressResolver` (allowlisted names only; overrides, then an injectable
  upstream; answers filtered through the policy; remembers what it handed out; with
  ``guest_answer`` every usable name is answered with the gateway's guest-side address) and
  :class:`DnsServer` (UDP + TCP; anything else NXDOMAIN, never forwarded).
- :mod:`.proxy`       :class:`EgressProxy`: forward proxy (absolute URI + CONNECT), transparent
  TLS by SNI, transparent HTTP by Host; limits, egress log.
- :mod:`.secrets`     :class:`SandboxCA`: per-sandbox, name-constrained CA and leaf minting.
- :mod:`.gateway`     :class:`EgressGateway`: one sandbox's resolver + DNS server + proxy + CA.

Errors: bad configuration is :class:`exec_sandbox.errors.SandboxInputError` with
``context["field"]``; refusals at run time are not exceptions on the host but answers to the guest
(``403`` + ``X-Sbx-Egress-Rule``, a TLS alert, NXDOMAIN) and entries in the egress log.

Transport decision: QEMU user networking with ``restrict=on`` plus ``guestfwd`` connectors, not
TAP + nftables. Why: it needs no root and changes nothing on the host (no TAP, no firewall rules
to undo, no forwarding sysctl), each sandbox's link is private to its QEMU process, and it is
tight: a restricted libslirp drops every guest packet but TCP to a ``guestfwd`` address (and its
DHCP/TFTP), so neither the host, its network nor slirp's DNS forwarder is reachable - verified
against a control that shows an unrestricted NIC leaking a guest's DNS query to the host's
resolver (tests/integration/test_network_slirp_dns.py). ``guestfwd=...-cmd:`` runs a connector per
guest connection (``socat``; a chardev target would carry one stream for all connections, QEMU
7.2). The guest sees the gateway at one address (10.0.2.100): proxy 3128, DNS 53 over TCP
(``options use-vc``: the link carries no UDP at all), transparent TLS 443 and HTTP 80; our DNS
answers allowed names with that address, so clients that ignore proxy settings land there too.
The gateway's listeners are Unix sockets in a private (0700) directory of the runtime dir
(``EgressGateway(unix_parent=...)``), so no other local user can use a sandbox's egress; that
directory (``egress-*``) carries an owner record, so when its process is killed outright the next
Scheduler on that runtime dir removes it (:func:`exec_sandbox.host.runtime_dirs.reap_dead_owners`). Costs:
one short-lived process per connection and transparent TLS only on port 443 (other ports through
``CONNECT``). The TAP + nftables design (``SO_ORIGINAL_DST``, any port
transparent) remains possible for root deployments; the proxy already takes an ``original_dst``
hook.

Not covered: QUIC/HTTP3 and any UDP but DNS (refused by design; clients fall back to TCP), HTTP/2
inside terminated TLS (ALPN offers http/1.1 only), secrets in bodies or URLs (headers only, over
TLS only), Host checks inside non-terminated TLS (SNI is checked; the encrypted Host is not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smartvm.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from exec_sandbox.egress.accounting import EgressLog, EgressLogEntry, EgressStats
    from exec_sandbox.egress.gateway import EgressGateway
    from exec_sandbox.egress.policy import (
        EgressLimits,
        EgressPolicy,
        Secret,
        SecretPlaceholders,
        forbidden_reason,
        is_forbidden_address,
        normalize_hostname,
    )
    from exec_sandbox.egress.proxy import EgressProxy, ProxyAddresses
    from exec_sandbox.egress.resolver import (
        DnsServer,
        DnsUpstream,
        EgressResolver,
        Resolution,
        SystemUpstream,
    )
    from exec_sandbox.egress.secrets import SandboxCA

# Lazy (PEP 562): a result model that names EgressLogEntry must not pull in cryptography,
# dnspython and h11 for sandboxes without a network.
_LAZY = {
    **dict.fromkeys(("EgressLog", "EgressLogEntry", "EgressStats"), "exec_sandbox.egress.accounting"),
    "EgressGateway": "exec_sandbox.egress.gateway",
    **dict.fromkeys(("EgressLimits", "EgressPolicy", "Secret", "SecretPlaceholders", "forbidden_reason",
                     "is_forbidden_address", "normalize_hostname"), "exec_sandbox.egress.policy"),
    **dict.fromkeys(("EgressProxy", "ProxyAddresses"), "exec_sandbox.egress.proxy"),
    **dict.fromkeys(("DnsServer", "DnsUpstream", "EgressResolver", "Resolution", "SystemUpstream"),
                    "exec_sandbox.egress.resolver"),
    "SandboxCA": "exec_sandbox.egress.secrets",
}

__all__ = [
    "DnsServer",
    "DnsUpstream",
    "EgressGateway",
    "EgressLimits",
    "EgressLog",
    "EgressLogEntry",
    "EgressPolicy",
    "EgressProxy",
    "EgressResolver",
    "EgressStats",
    "ProxyAddresses",
    "Resolution",
    "SandboxCA",
    "Secret",
    "SecretPlaceholders",
    "SystemUpstream",
    "forbidden_reason",
    "is_forbidden_address",
    "normalize_hostname",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
