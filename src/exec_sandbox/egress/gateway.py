"""One sandbox's egress edge: resolver + DNS server + proxy + CA + placeholders, started together.

This is the object the VM wiring will hold per sandbox (see the package docstring for the plan).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from exec_sandbox.egress.accounting import EgressLogEntry, EgressStats
from exec_sandbox.egress.policy import EgressPolicy, IPAddress, SecretPlaceholders
from exec_sandbox.egress.proxy import EgressProxy, ProxyAddresses
from exec_sandbox.egress.resolver import DnsServer, EgressResolver, Upstream
from exec_sandbox.egress.secrets import SandboxCA
from smartvm.cleanup import AsyncService
from smartvm.leftovers import make_owned_dir, remove_owned_dir

__all__ = ["EgressGateway"]


class EgressGateway(AsyncService):
    """Everything one sandbox's traffic goes through; ``async with`` starts and stops it all."""

    def __init__(self, policy: EgressPolicy, *, upstream: Upstream | None = None,
                 upstream_ca_file: str | Path | None = None, host: str = "127.0.0.1",
                 transparent_tls_port: int = 443, transparent_http_port: int = 80,
                 log_size: int = 1024, idle_timeout: float = 300.0,
                 guest_answer: IPAddress | None = None, unix_parent: Path | None = None) -> None:
        self.policy = policy
        self.host = host
        self.placeholders = SecretPlaceholders(policy)
        hosts = policy.secret_hosts()
        self.ca: SandboxCA | None = SandboxCA(hosts) if hosts else None
        self.resolver = EgressResolver(policy, upstream, guest_answer=guest_answer)
        self.dns = DnsServer(self.resolver)
        self.proxy = EgressProxy(policy, self.resolver, placeholders=self.placeholders, ca=self.ca,
                                 upstream_ca_file=upstream_ca_file, log_size=log_size,
                                 transparent_tls_port=transparent_tls_port,
                                 transparent_http_port=transparent_http_port, idle_timeout=idle_timeout)
        self.dns_address: tuple[str, int] | None = None
        self.proxy_addresses: ProxyAddresses | None = None
        # With ``unix_parent`` (a verified private directory): the listeners are Unix sockets in a
        # fresh private directory made there (owner record: a crash leaves it to the reaper) and
        # removed at close (keys forward, tls, http, dns; DNS over streams only), not loopback
        # ports that any local user could connect to.
        self.unix_parent = unix_parent
        self.unix_dir: Path | None = None
        self.unix_paths: dict[str, Path] = {}

    async def start(self) -> None:
        """Bind the DNS server and the proxy listeners (on ``host``, ephemeral ports; or Unix
        sockets in ``unix_dir``)."""
        try:
            if self.unix_parent is not None:
                self.unix_dir = await asyncio.to_thread(
                    make_owned_dir, self.unix_parent, "egress-", kind="egress")
                paths = await self.proxy.start_unix(self.unix_dir)
                paths["dns"] = await self.dns.start_unix(self.unix_dir / "dns.sock")
                self.unix_paths = paths
            else:
                self.dns_address = await self.dns.start(self.host)
                self.proxy_addresses = await self.proxy.start(self.host)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop everything; idempotent."""
        await self.proxy.aclose()
        await self.dns.aclose()
        self.dns_address = None
        self.proxy_addresses = None
        self.unix_paths = {}
        if self.unix_dir is not None:  # with the socket files asyncio (3.11) leaves behind
            await asyncio.to_thread(remove_owned_dir, self.unix_dir)
            self.unix_dir = None


    @property
    def ca_pem(self) -> bytes | None:
        """The CA certificate for the guest's trust store (``None`` when there are no secrets)."""
        return self.ca.cert_pem if self.ca is not None else None

    def guest_env(self, proxy_url: str | None = None) -> dict[str, str]:
        """Environment for the guest: secret placeholders and proxy settings.

        ``proxy_url`` is the forward proxy as the guest sees it (after the VM wiring maps it);
        by default the host-side address (useful only for host-side tests).
        """
        env = self.placeholders.guest_env()
        if proxy_url is None and self.proxy_addresses is not None:
            proxy_url = f"http://{self.proxy_addresses.forward[0]}:{self.proxy_addresses.forward[1]}"
        if proxy_url:
            for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                env[key] = proxy_url
        return env

    async def settled(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until no connection is open, so that the log holds every
        connection the guest has finished; False if some stayed open."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.stats.active_connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return not self.stats.active_connections

    def egress_log(self, *, allowed: bool | None = None) -> list[EgressLogEntry]:
        return self.proxy.log.entries(allowed=allowed)

    @property
    def stats(self) -> EgressStats:
        return self.proxy.stats
