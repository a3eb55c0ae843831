"""What network one run or session gets: :class:`NetworkPlan`, built from ``SchedulerConfig`` and
the call's own arguments, and the gateway it needs (see :mod:`exec_sandbox.vm.network` for the
link and :mod:`exec_sandbox.egress` for the gateway).

No network is the default and costs nothing: no plan, no NIC, nothing from ``egress`` started.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import SandboxInputError
from exec_sandbox.models import PortForward
from exec_sandbox.validation import validate_domains, validate_port_forwards
from exec_sandbox.vm.network import EGRESS_ADDRESS

if TYPE_CHECKING:  # egress (cryptography, dnspython, h11) is imported only by networked calls
    from exec_sandbox.egress import DnsUpstream, EgressGateway, EgressPolicy

__all__ = ["NetworkPlan", "plan_network", "start_gateway"]


@dataclass(frozen=True)
class NetworkPlan:
    """A sandbox's network: the egress policy (``policy.enabled``: a gateway) and port forwards."""

    policy: EgressPolicy
    forwards: tuple[PortForward, ...] = ()


def _secret_data(secrets: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(secrets, Mapping):
        raise SandboxInputError("secrets must map names to Secret(value=..., hosts=[...])",
                                context={"field": "secrets"})
    out: dict[str, Any] = {}
    for name, item in secrets.items():
        dump = getattr(item, "model_dump", None)  # a Secret: its fields (the value stays a SecretStr)
        out[name] = dump() if dump is not None and not isinstance(item, Mapping) else item
    return out


def plan_network(
    config: SchedulerConfig,
    *,
    allowed_domains: Iterable[str] | None = None,
    port_forwards: Iterable[PortForward | Mapping[str, object] | int | str] | None = None,
    secrets: Mapping[str, Any] | None = None,
) -> NetworkPlan | None:
    """The plan for one call (per-call values replace the config's); ``None``: no NIC at all.

    Raises :class:`SandboxInputError` naming the field for any bad value."""
    if (not allowed_domains and not port_forwards and not secrets and not config.network_enabled
            and not config.allowed_domains and not config.allowed_cidrs and not config.port_forwards
            and not config.secrets):
        return None  # the default: nothing of egress is even imported
    from exec_sandbox.egress import EgressPolicy

    domains = config.allowed_domains if allowed_domains is None else validate_domains(allowed_domains)
    forwards = config.port_forwards if port_forwards is None else validate_port_forwards(port_forwards)
    chosen = config.secrets if secrets is None else secrets
    policy = EgressPolicy(
        allowed_domains=list(domains),
        allowed_cidrs=list(config.allowed_cidrs),
        host_overrides=dict(config.host_overrides),
        allow_private=config.egress_allow_private,
        secrets=_secret_data(chosen),
        limits=dict(config.egress_limits),
    )
    if policy.secrets and not policy.enabled:
        raise SandboxInputError("secrets need allowed_domains (the hosts they may be sent to)",
                                context={"field": "secrets"})
    if not policy.enabled and not forwards and not config.network_enabled:
        return None
    return NetworkPlan(policy=policy, forwards=tuple(forwards))


def _upstream(server: str | None) -> DnsUpstream | None:
    from exec_sandbox.egress import DnsUpstream

    if server is None:
        return None
    host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "53")
    try:
        ipaddress.ip_address(host.strip("[]"))
        return DnsUpstream(host.strip("[]"), int(port))
    except ValueError:
        raise SandboxInputError(f"egress_dns_server: {server!r} is not IP or IP:port",
                                context={"field": "egress_dns_server"}) from None


async def start_gateway(
    plan: NetworkPlan, config: SchedulerConfig, runtime_dir: Path | None
) -> EgressGateway | None:
    """A started gateway for ``plan`` (None when nothing may be reached); the caller closes it.
    Its listeners are Unix sockets in a private directory under ``runtime_dir`` (when given)."""
    if not plan.policy.enabled:
        return None
    from exec_sandbox.egress import EgressGateway

    gateway = EgressGateway(plan.policy, upstream=_upstream(config.egress_dns_server),
                            upstream_ca_file=config.egress_ca_file,
                            guest_answer=ipaddress.ip_address(EGRESS_ADDRESS), unix_parent=runtime_dir)
    await gateway.start()
    return gateway
