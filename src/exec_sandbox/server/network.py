"""E2B's network fields of a create (``allow_internet_access``, ``network``) mapped onto our egress.

E2B's sandboxes reach the whole internet unless told otherwise; ours reach nothing unless the caller
lists host names, which the sandbox's egress gateway then lets through (``allowed_domains``). So:

- neither field, ``allow_internet_access: false``, or ``denyOut`` covering ``0.0.0.0/0`` alone: no
  network at all (our default);
- ``network.allowOut`` host names (``*.example.com`` wildcards too) -> ``allowed_domains``; a
  ``denyOut`` next to it changes nothing (everything not allowed is refused anyway);
- internet without a list (``allow_internet_access: true`` or a ``denyOut`` of some blocks only):
  400, since only allowlisted egress is offered; so are IPs/CIDRs in ``allowOut`` and the request
  ``rules``/``egressProxy`` features we do not have (silently ignoring them would mislead the caller).

Where allowlisted names resolve (``host_overrides``) and whether private addresses are reachable
(``egress_allow_private``) is the server's configuration, never the caller's.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from exec_sandbox.server.errors import BadRequestError
from exec_sandbox.validation import validate_domains

__all__ = ["ALL_TRAFFIC", "NetworkBody", "allowed_domains_for", "refuse_saving_networked"]

ALL_TRAFFIC: Final = "0.0.0.0/0"
_ONLY_ALLOWLIST: Final = (
    "sbx serve offers only allowlisted egress (a sandbox has no network by default): "
    "list the host names it may reach in network.allowOut"
)


class NetworkBody(BaseModel):
    """E2B's ``SandboxNetworkConfig`` (fields we do not act on, e.g. ``allowPublicTraffic``, are ignored)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    allow_out: list[str] | None = Field(default=None, alias="allowOut")
    deny_out: list[str] | None = Field(default=None, alias="denyOut")
    rules: dict[str, Any] | None = None
    egress_proxy: dict[str, Any] | None = Field(default=None, alias="egressProxy")


def _is_address(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        return False
    return True


def allowed_domains_for(allow_internet_access: bool | None, network: NetworkBody | None) -> tuple[str, ...]:
    """The ``allowed_domains`` a create asks for (empty: no network); :class:`BadRequestError` naming
    the field for what cannot be offered (see the module docstring)."""
    net = network or NetworkBody()
    if net.rules:
        raise BadRequestError(
            "network.rules (request transforms) are not supported by sbx serve",
            context={"field": "network.rules"},
        )
    if net.egress_proxy:
        raise BadRequestError(
            "network.egressProxy is not supported by sbx serve", context={"field": "network.egressProxy"}
        )
    allow = net.allow_out or []
    addresses = [a for a in allow if _is_address(a)]
    if addresses:
        raise BadRequestError(
            f"network.allowOut: {addresses[0]!r} is an address; {_ONLY_ALLOWLIST}",
            context={"field": "network.allowOut", "value": addresses[0]},
        )
    if allow:
        return validate_domains(allow, field="network.allowOut")
    deny = [d.strip() for d in net.deny_out or []]
    if deny and ALL_TRAFFIC not in deny:
        raise BadRequestError(
            f"network.denyOut without allowOut asks for internet access; {_ONLY_ALLOWLIST}",
            context={"field": "network.denyOut"},
        )
    if allow_internet_access and not deny:
        raise BadRequestError(
            f"allow_internet_access: {_ONLY_ALLOWLIST}", context={"field": "allow_internet_access"}
        )
    return ()


def refuse_saving_networked(allowed_domains: tuple[str, ...], action: str) -> None:
    """Pause, fork and snapshot save and restore VMs, but not their egress gateways: a sandbox with a
    network would come back without one (or, restored from disk, with a stale NIC). 400 until then."""
    if allowed_domains:
        raise BadRequestError(
            f"a sandbox with network egress (network.allowOut) cannot be {action} by sbx serve",
            context={"field": "network.allowOut"},
        )
