"""The guest's DNS: allowlisted names only, resolved on the host, nothing forwarded.

:class:`EgressResolver` answers "which addresses may this sandbox reach for ``name``": the name
must be allowlisted; ``host_overrides`` come first, else the injectable upstream
(:class:`SystemUpstream` = the host's resolver through ``loop.getaddrinfo``; :class:`DnsUpstream`
= one DNS server, e.g. a test's); every address is filtered through the policy (private ranges
refused unless ``allow_private``: DNS-rebinding defence). It remembers what it handed out per name
(bounded), and the proxy only ever dials addresses it got from here.

:class:`DnsServer` serves that over UDP and TCP (wire format by ``dnspython``). A query for a name
that is not allowlisted is answered NXDOMAIN locally and never reaches any upstream, so a guest
cannot tunnel data out through DNS labels. Only A/AAAA get records; other types of allowed names
get an empty NOERROR answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from exec_sandbox.egress.policy import EgressPolicy, IPAddress, normalize_hostname

__all__ = ["DnsServer", "DnsUpstream", "EgressResolver", "Resolution", "SystemUpstream", "Upstream"]

_TTL = 30
_MAX_NAMES = 4096
_MAX_INFLIGHT = 256  # UDP queries being answered at once (more are dropped)
_MAX_TCP_CLIENTS = 64


class Upstream(Protocol):
    """Where allowlisted names are really resolved (only ever asked about allowlisted names)."""

    async def lookup(self, name: str) -> list[IPAddress]: ...


class SystemUpstream:
    """The host's own resolver (``/etc/hosts``, ``resolv.conf``, nsswitch) via ``getaddrinfo``."""

    async def lookup(self, name: str) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return []
        out: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            addr = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if addr not in out:
                out.append(addr)
        return out


class DnsUpstream:
    """One DNS server (host, port) asked for A and AAAA over UDP."""

    def __init__(self, host: str, port: int = 53, *, timeout: float = 3.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout

    async def lookup(self, name: str) -> list[IPAddress]:
        out: list[IPAddress] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            query = dns.message.make_query(name, rdtype)
            try:
                resp = await dns.asyncquery.udp(query, self.host, port=self.port, timeout=self.timeout)
            except (dns.exception.DNSException, OSError):
                continue
            for rrset in resp.answer:
                if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    out.extend(ipaddress.ip_address(rdata.address) for rdata in rrset)
        return out


@dataclass(frozen=True)
class Resolution:
    """The answer for one name: usable ``addresses`` and why others (or the name) were refused."""

    name: str
    addresses: list[IPAddress] = field(default_factory=list)
    refused: list[tuple[IPAddress, str]] = field(default_factory=list)
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.addresses)

    def refusal(self) -> str:
        """One sentence saying why nothing is usable."""
        if self.reason:
            return self.reason
        if self.refused:
            return self.refused[0][1]
        return f"{self.name} has no address"


class EgressResolver:
    """Resolves allowlisted names for one sandbox and remembers what it handed out."""

    def __init__(self, policy: EgressPolicy, upstream: Upstream | None = None, *,
                 guest_answer: IPAddress | None = None) -> None:
        self.policy = policy
        self.upstream: Upstream = upstream if upstream is not None else SystemUpstream()
        # Set when the guest reaches everything through one address (QEMU user networking): DNS
        # then answers every usable allowlisted name with it (A only), and the proxy behind that
        # address dials the real one, found here again by SNI/Host.
        self.guest_answer = guest_answer
        self._cache: OrderedDict[str, tuple[float, list[IPAddress]]] = OrderedDict()
        self._handed: OrderedDict[str, set[IPAddress]] = OrderedDict()
        self.upstream_queries = 0

    async def resolve(self, name: str) -> Resolution:
        """Resolve ``name`` if allowlisted; never asks the upstream about any other name."""
        try:
            host = normalize_hostname(name)
        except ValueError as exc:
            return Resolution(name=name, reason=f"{name!r} is not a host name: {exc}")
        if not self.policy.is_allowed(host):
            return Resolution(name=host, reason=f"{host} is not in allowed_domains")
        raw = self.policy.host_overrides.get(host)
        if raw is None:
            raw = await self._lookup(host)
        addresses: list[IPAddress] = []
        refused: list[tuple[IPAddress, str]] = []
        for ip in raw:
            why = self.policy.address_refusal(ip)
            if why is None:
                addresses.append(ip)
            else:
                refused.append((ip, why))
        if addresses:
            self._remember(host, addresses)
        return Resolution(name=host, addresses=addresses, refused=refused)

    async def _lookup(self, host: str) -> list[IPAddress]:
        now = time.monotonic()
        hit = self._cache.get(host)
        if hit is not None and hit[0] > now:
            return hit[1]
        self.upstream_queries += 1
        found = await self.upstream.lookup(host)
        self._cache[host] = (now + _TTL, found)
        self._cache.move_to_end(host)
        while len(self._cache) > _MAX_NAMES:
            self._cache.popitem(last=False)
        return found

    def _remember(self, host: str, addresses: list[IPAddress]) -> None:
        seen = self._handed.setdefault(host, set())
        seen.update(addresses)
        if len(seen) > 64:
            self._handed[host] = set(addresses)
        self._handed.move_to_end(host)
        while len(self._handed) > _MAX_NAMES:
            self._handed.popitem(last=False)

    def handed_out(self, name: str) -> set[IPAddress]:
        """Addresses given out for ``name`` so far (the proxy refuses others for that name)."""
        try:
            return set(self._handed.get(normalize_hostname(name), ()))
        except ValueError:
            return set()

    async def answer(self, wire: bytes) -> bytes | None:
        """A DNS response (wire format) for query ``wire``; ``None`` for garbage (dropped)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # dnspython raises many types for malformed input
            return None
        if query.flags & dns.flags.QR:
            return None
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.RA
        if query.opcode() != dns.opcode.QUERY:
            resp.set_rcode(dns.rcode.NOTIMP)
        elif len(query.question) != 1:
            resp.set_rcode(dns.rcode.FORMERR)
        else:
            q = query.question[0]
            name = q.name.to_text(omit_final_dot=True)
            if q.rdclass != dns.rdataclass.IN:
                resp.set_rcode(dns.rcode.REFUSED)
            elif not self.policy.is_allowed(name):
                resp.set_rcode(dns.rcode.NXDOMAIN)
            elif q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                result = await self.resolve(name)
                version = 4 if q.rdtype == dns.rdatatype.A else 6
                usable = [self.guest_answer] if self.guest_answer and result.ok else result.addresses
                texts = [str(ip) for ip in usable if ip.version == version]
                if texts:
                    resp.answer.append(dns.rrset.from_text_list(q.name, _TTL, "IN", q.rdtype, texts))
        return resp.to_wire(max_size=65535)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, resolver: EgressResolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if len(self.tasks) >= _MAX_INFLIGHT:
            return
        task = asyncio.get_running_loop().create_task(self._reply(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        out = await self.resolver.answer(data)
        if out is not None and self.transport is not None and not self.transport.is_closing():
            if len(out) > 1232:
                with contextlib.suppress(Exception):
                    resp = dns.message.from_wire(out)
                    resp.answer.clear()
                    resp.flags |= dns.flags.TC
                    out = resp.to_wire()
            self.transport.sendto(out, addr)


class DnsServer:
    """Serves an :class:`EgressResolver` on UDP and TCP at one address (``port=0`` picks one)."""

    def __init__(self, resolver: EgressResolver) -> None:
        self.resolver = resolver
        self._udp: asyncio.DatagramTransport | None = None
        self._proto: _UdpProtocol | None = None
        self._tcp: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self._tcp_clients = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Bind UDP (and TCP on the same port); returns ``(host, port)``. A second call is a no-op."""
        if self.address is not None:
            return self.address
        loop = asyncio.get_running_loop()
        for attempt in range(20):  # an ephemeral UDP port may be taken for TCP: pick again
            transport, proto = await loop.create_datagram_endpoint(
                functools.partial(_UdpProtocol, self.resolver), local_addr=(host, port))
            bound = int(transport.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError as exc:
                transport.close()
                if port != 0 or exc.errno != errno.EADDRINUSE or attempt == 19:
                    raise
                continue
            except BaseException:
                transport.close()
                raise
            break
        self._udp, self._proto = transport, proto
        self.address = (host, int(bound))
        return self.address

    async def start_unix(self, path: Path) -> Path:
        """Serve DNS over a stream Unix socket at ``path`` (TCP framing; no UDP): for a guest whose
        link carries streams only, reached through a connector, with file permissions as access
        control instead of a loopback port anyone on the host can use."""
        if self.address is not None:
            raise RuntimeError("DnsServer already started")
        self._tcp = await asyncio.start_unix_server(self._serve_tcp, str(path))
        self.address = (str(path), 0)
        return path

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_clients >= _MAX_TCP_CLIENTS:
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), 10)
                body = await asyncio.wait_for(reader.readexactly(int.from_bytes(head, "big")), 10)
                out = await self.resolver.answer(body)
                if out is None:
                    break
                writer.write(len(out).to_bytes(2, "big") + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._tcp_clients -= 1
            writer.close()

    async def aclose(self) -> None:
        """Stop serving; idempotent."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._proto is not None:
            for task in list(self._proto.tasks):
                task.cancel()
            self._proto = None
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()
            self._tcp = None
        self.address = None

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
