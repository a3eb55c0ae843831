"""Network egress for sandboxes, host side: allowlist policy, our DNS, the egress proxy, secrets.

Status: the host-side core exists and is tested against real servers on 127.0.0.1; it is not yet
wired to VMs. Modules:

- :mod:`.policy`      pure, validated :class:`EgressPolicy` (names, CIDRs, ports, overrides,
  ``allow_private``, :class:`Secret` s, :class:`EgressLimits`), address classification,
  :class:`SecretPlaceholders` (``sbx-secret-<random>``; the real values never leave the host).
- :mod:`.resolver`    :class:`EgressResolver` (allowlisted names only; overrides, then an injectable
  upstream; answers filtered through the policy; remembers what it handed out) and
  :class:`DnsServer` (UDP + TCP; anything else NXDOMAIN, never forwarded).
- :mod:`.proxy`       :class:`EgressProxy`: forward proxy (absolute URI + CONNECT), transparent
  TLS by SNI, transparent HTTP by Host; limits, egress log.
- :mod:`.secrets`     :class:`SandboxCA`: per-sandbox, name-constrained CA and leaf minting.
- :mod:`.gateway`     :class:`EgressGateway`: one sandbox's resolver + DNS server + proxy + CA.

Errors: bad configuration is :class:`exec_sandbox.errors.SandboxInputError` with
``context["field"]``; refusals at run time are not exceptions on the host but answers to the guest
(``403`` + ``X-Sbx-Egress-Rule``, a TLS alert, NXDOMAIN) and entries in the egress log.

Wiring plan (next session; nothing below exists yet):

1. ``SchedulerConfig``/``run()``/``session()`` take ``allowed_domains``, ``allowed_cidrs``,
   ``host_overrides``, ``egress_allow_private``, ``secrets``, egress limits and build one
   :class:`EgressPolicy` (its ``SandboxInputError`` propagates unchanged). ``not policy.enabled``
   = no NIC at all (today's default, zero cost: nothing here is imported or started).
2. Per sandbox, ``EgressGateway(policy, host=<the sandbox's host-side address>)`` is started
   before boot with its ``aclose`` registered as the undo (one gateway per sandbox = identity by
   listener; no per-connection attribution needed). Its listeners bind the host end of the
   sandbox's link only.
3. The link, as root (smartvm already makes TAPs through netlink): a TAP per VM (QEMU
   ``-netdev tap,ifname=…,script=no``), a /30 per sandbox, and nftables rules on that TAP:
   udp+tcp/53 -> the gateway's DNS, tcp/80 -> transparent HTTP, every other TCP port ->
   transparent TLS (SNI), the forward proxy reachable at its own port; ``forward`` chain drops
   everything from the TAP (no route to the host's network, no UDP but DNS, no ICMP out).
   The proxy gets the original destination through the ``original_dst`` hook
   (``getsockopt(SO_ORIGINAL_DST)``), which also gives the real port for TLS on ports other than
   443 and lets the proxy refuse an address our DNS never handed out for that SNI.
   Without root: QEMU user networking with ``restrict=on`` plus ``guestfwd`` per service
   (``cmd:`` variant, one connector per connection: a plain chardev target carries a single
   stream) — to be verified and measured; the transparent TLS port is then fixed (443).
4. The guest agent configures the NIC from a frame (address, route, resolver, MAC), not the
   kernel command line, so L1-restored and forked guests get a fresh address/MAC by the same
   frame after restore (the gateway is per sandbox, so a restored clone gets its own).
   ``/etc/resolv.conf`` points at the gateway; ``HTTP(S)_PROXY``, ``pip``/``npm`` settings come
   from :meth:`EgressGateway.guest_env` (plus the secret placeholders); the CA PEM
   (:attr:`EgressGateway.ca_pem`) goes into the guest trust store (``update-ca-certificates``,
   ``SSL_CERT_FILE``/``REQUESTS_CA_BUNDLE``/``NODE_EXTRA_CA_CERTS``) only when there are secrets.
5. The egress log (:meth:`EgressGateway.egress_log`) and :class:`EgressStats` go on the
   result/session and into ``sbx serve``'s Prometheus metrics.

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
