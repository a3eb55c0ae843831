"""Validated egress configuration and the pure decisions made from it.

Nothing here does I/O. :class:`EgressPolicy` says which names (exact or ``*.`` suffix wildcards,
IDNA-normalised), which IP networks and ports a sandbox may reach, hosts-file-like overrides, the
limits, and the secrets with the hosts each one may be sent to. Bad input raises
:class:`~exec_sandbox.errors.SandboxInputError` whose ``context["field"]`` names the field.

:class:`SecretPlaceholders` holds the per-sandbox mapping placeholder -> real value; the guest only
ever gets :meth:`SecretPlaceholders.guest_env` (name -> ``sbx-secret-<random>``).
"""

from __future__ import annotations

import ipaddress
import re
import secrets as _secrets
from typing import Any

import idna
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from exec_sandbox.errors import SandboxInputError

__all__ = [
    "EgressLimits",
    "EgressPolicy",
    "IPAddress",
    "Secret",
    "SecretPlaceholders",
    "forbidden_reason",
    "is_forbidden_address",
    "normalize_hostname",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def normalize_hostname(name: str, *, wildcard: bool = False) -> str:
    """Lower-case, IDNA (UTS 46) A-label form of ``name``, without a trailing dot.

    ``wildcard=True`` accepts one leading ``*.``. Raises ``ValueError`` for anything that is not a
    DNS host name (IP literals included).
    """
    if not isinstance(name, str):
        raise ValueError("a host name must be a string")
    text = name.strip().rstrip(".")
    prefix = ""
    if wildcard and text.startswith("*."):
        prefix, text = "*.", text[2:]
    if not text or "*" in text:
        raise ValueError(f"not a host name: {name!r}")
    if _is_ip_literal(text):
        raise ValueError(f"IP literal {name!r} is not a host name (use allowed_cidrs)")
    try:
        ascii_name = idna.encode(text, uts46=True, std3_rules=False).decode("ascii").lower()
    except idna.IDNAError as exc:
        raise ValueError(f"not a valid (IDNA) host name: {name!r}: {exc}") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"not a valid host name: {name!r}")
    if labels[-1].isdigit():
        raise ValueError(f"not a valid host name (numeric top-level label): {name!r}")
    return prefix + ascii_name


def forbidden_reason(ip: IPAddress | str) -> str | None:
    """Why ``ip`` is a private/special destination (``None`` when it is a public unicast address)."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped or (
            ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF) if addr in _NAT64 else None)
        if mapped is not None:
            inner = forbidden_reason(mapped)
            return f"{inner} (IPv4 inside IPv6)" if inner else None
    if addr in _METADATA:
        return "cloud metadata address"
    if addr.is_unspecified:
        return "unspecified address"
    if addr.is_loopback:
        return "loopback range"
    if addr.is_link_local:
        return "link-local range"
    if addr.is_multicast:
        return "multicast range"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return "carrier-grade NAT range (100.64.0.0/10)"
    if addr.is_private:
        return "private range"
    if addr.is_reserved or not addr.is_global:
        return "reserved range"
    return None


def is_forbidden_address(ip: IPAddress | str) -> bool:
    """True for loopback, RFC 1918, CGNAT, link-local/metadata, ULA, unspecified, multicast, reserved."""
    return forbidden_reason(ip) is not None


class Secret(BaseModel):
    """A credential the guest never sees: only sent, by the proxy, in requests to ``hosts``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: SecretStr
    hosts: list[str]

    @field_validator("value")
    @classmethod
    def _non_empty(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if not raw or any(ch in raw for ch in "\r\n\x00"):
            raise ValueError("a secret value must be non-empty and contain no CR, LF or NUL")
        return value

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        if not hosts:
            raise ValueError("a secret needs at least one host it may be sent to")
        return sorted({normalize_hostname(h, wildcard=True) for h in hosts})


class EgressLimits(BaseModel):
    """Per-sandbox caps, enforced by the proxy while bytes flow (``None`` = no cap)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_connections: int = Field(default=64, ge=1, le=100_000)
    max_bytes_in: int | None = Field(default=None, ge=0)
    max_bytes_out: int | None = Field(default=None, ge=0)
    bandwidth_bytes_per_s: int | None = Field(default=None, ge=1024)


class EgressPolicy(BaseModel):
    """What one sandbox may reach. Validation errors are :class:`SandboxInputError` naming the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allowed_domains: list[str] = Field(default_factory=list)
    allowed_cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    allowed_ports: list[int] | None = None
    host_overrides: dict[str, list[IPAddress]] = Field(default_factory=dict)
    allow_private: bool = False
    secrets: dict[str, Secret] = Field(default_factory=dict)
    limits: EgressLimits = Field(default_factory=EgressLimits)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(part) for part in err["loc"]) or "policy"
            raise SandboxInputError(f"egress policy: {field}: {err['msg']}",
                                    context={"field": field, "error": err["msg"]}) from None
        self._check_secret_hosts()

    @field_validator("allowed_domains")
    @classmethod
    def _domains(cls, names: list[str]) -> list[str]:
        return sorted({normalize_hostname(n, wildcard=True) for n in names})

    @field_validator("allowed_cidrs", mode="before")
    @classmethod
    def _cidrs(cls, cidrs: Any) -> Any:
        if isinstance(cidrs, list):
            return [ipaddress.ip_network(str(c), strict=False) for c in cidrs]
        return cidrs

    @field_validator("allowed_ports")
    @classmethod
    def _ports(cls, ports: list[int] | None) -> list[int] | None:
        if ports is None:
            return None
        for port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} out of range 1-65535")
        return sorted(set(ports))

    @field_validator("host_overrides", mode="before")
    @classmethod
    def _overrides(cls, overrides: Any) -> Any:
        if not isinstance(overrides, dict):
            return overrides
        out: dict[str, list[IPAddress]] = {}
        for name, ips in overrides.items():
            items = [ips] if isinstance(ips, str) else list(ips)
            if not items:
                raise ValueError(f"host override {name!r} has no address")
            out[normalize_hostname(name)] = [ipaddress.ip_address(str(ip)) for ip in items]
        return out

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, secrets: dict[str, Secret]) -> dict[str, Secret]:
        for name in secrets:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name):
                raise ValueError(f"secret name {name!r} is not an environment variable name")
        return secrets

    def _check_secret_hosts(self) -> None:
        for name, secret in self.secrets.items():
            for host in secret.hosts:
                probe = "x." + host[2:] if host.startswith("*.") else host
                if not self.is_allowed(probe):
                    field = f"secrets.{name}.hosts"
                    raise SandboxInputError(
                        f"egress policy: {field}: host {host!r} is not in allowed_domains",
                        context={"field": field, "error": "secret host not allowlisted"})

    # -- pure decisions ------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether the sandbox gets a network at all (any name or network allowed)."""
        return bool(self.allowed_domains or self.allowed_cidrs)

    def is_allowed(self, name: str) -> bool:
        """Whether host name ``name`` is allowlisted (exact, or strictly below a ``*.`` wildcard)."""
        try:
            host = normalize_hostname(name)
        except ValueError:
            return False
        for pattern in self.allowed_domains:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]):
                    return True
            elif host == pattern:
                return True
        return False

    def port_refusal(self, port: int) -> str | None:
        """Why ``port`` may not be used (``None`` when it may)."""
        if not 1 <= port <= 65535:
            return f"port {port} out of range"
        if self.allowed_ports is not None and port not in self.allowed_ports:
            return f"port {port} is not in allowed_ports"
        return None

    def address_refusal(self, ip: IPAddress | str) -> str | None:
        """Why a connection to ``ip`` (resolved by us for an allowed name) is refused, or ``None``."""
        reason = forbidden_reason(ip)
        if reason is not None and not self.allow_private:
            return f"destination {ip} is in a {reason} (allow_private is off)"
        return None

    def ip_literal_refusal(self, ip: IPAddress | str) -> str | None:
        """Why a destination given as an IP literal is refused (only ``allowed_cidrs`` admit one)."""
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        if not any(addr in net for net in self.allowed_cidrs):
            return f"IP literal destination {addr} refused (not in allowed_cidrs)"
        return self.address_refusal(addr)

    def secret_hosts_match(self, patterns: list[str], name: str) -> bool:
        """Whether ``name`` matches one of ``patterns`` (exact or ``*.`` suffix)."""
        try:
            host = normalize_hostname(name)
        except ValueError:
            return False
        return any(host.endswith(p[1:]) if p.startswith("*.") else host == p for p in patterns)

    def secret_hosts(self) -> list[str]:
        """Every host pattern some secret may be sent to (these get TLS termination)."""
        return sorted({h for s in self.secrets.values() for h in s.hosts})

    def needs_interception(self, name: str) -> bool:
        """Whether TLS to ``name`` is terminated by the proxy (it is a secret's host)."""
        return self.secret_hosts_match(self.secret_hosts(), name)


class SecretPlaceholders:
    """Per-sandbox opaque placeholders for a policy's secrets.

    The guest gets :meth:`guest_env`; the real values stay in this host-side object, which the
    proxy asks for :meth:`substitutions` for one destination host.
    """

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._by_name: dict[str, str] = {
            name: f"sbx-secret-{_secrets.token_hex(16)}" for name in policy.secrets}

    def __repr__(self) -> str:
        return f"SecretPlaceholders(names={sorted(self._by_name)})"

    def guest_env(self) -> dict[str, str]:
        """Environment for the guest: secret name -> placeholder (never the value)."""
        return dict(self._by_name)

    def substitutions(self, host: str) -> list[tuple[bytes, bytes]]:
        """(placeholder, value) pairs to swap in request headers sent to ``host`` (may be empty)."""
        out = []
        for name, secret in self._policy.secrets.items():
            if self._policy.secret_hosts_match(secret.hosts, host):
                out.append((self._by_name[name].encode(), secret.value.get_secret_value().encode()))
        return out
