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
   ``host_overrides``, ``egress_allow_private``, ``secrets``, egress limits, and build one
   :class:`EgressPolicy` (its ``SandboxInputError`` propagates unchanged). ``policy.enabled`` false
   = no NIC at all (today's default, zero cost).
2. Per sandbox, ``async with EgressGateway(policy) as gw`` before boot, ``aclose`` registered as
   the undo. The guest gets a NIC on QEMU user-mode networking with ``restrict=on`` (no route to
   anything) and ``guestfwd`` rules that map fixed guest-side addresses to the gateway's listeners:
   ``10.0.2.100:53`` -> DNS (TCP; UDP DNS through slirp's built-in ``dns=`` cannot be redirected,
   so the guest resolver uses TCP (``options use-vc``) or the agent relays UDP 53),
   ``10.0.2.100:3128`` -> forward proxy, ``:443`` -> transparent TLS, ``:80`` -> transparent HTTP.
   With ``restrict=on`` the guest has no other way out: no raw route, no UDP but DNS.
   (Alternative with a TAP device in a netns: nftables DNAT of tcp/80, tcp/443, udp+tcp/53 to the
   listeners and ``original_dst`` (``SO_ORIGINAL_DST``) passed to :class:`EgressProxy`.)
3. The agent configures the NIC at boot from a frame (address, route, resolver), not the kernel
   command line, so L1-restored and forked guests get a fresh address/MAC via the same frame after
   restore; ``/etc/resolv.conf`` points at the gateway; ``HTTP(S)_PROXY``/``NO_PROXY``,
   ``PIP_*``/``npm`` settings come from :meth:`EgressGateway.guest_env`; the CA PEM
   (:attr:`EgressGateway.ca_pem`) is added to the guest trust store (``update-ca-certificates``
   plus ``SSL_CERT_FILE``/``REQUESTS_CA_BUNDLE``/``NODE_EXTRA_CA_CERTS``). Secrets reach the guest
   only as placeholders in its environment.
4. The egress log and :class:`EgressStats` go on the result/session and into ``sbx serve``'s
   Prometheus metrics.
"""

from __future__ import annotations

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
from exec_sandbox.egress.proxy import EgressProxy, ProxyAddresses, Refused
from exec_sandbox.egress.resolver import DnsServer, DnsUpstream, EgressResolver, Resolution, SystemUpstream
from exec_sandbox.egress.secrets import SandboxCA

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
    "Refused",
    "Resolution",
    "SandboxCA",
    "Secret",
    "SecretPlaceholders",
    "SystemUpstream",
    "forbidden_reason",
    "is_forbidden_address",
    "normalize_hostname",
]
