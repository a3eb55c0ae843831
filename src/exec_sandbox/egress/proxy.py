"""The per-sandbox egress proxy (asyncio): forward proxy, transparent TLS (SNI) and plain HTTP.

Three listeners, one policy:

- **forward proxy** (``HTTP_PROXY``/``HTTPS_PROXY``): absolute-URI ``http://`` requests and
  ``CONNECT host:port``. After a CONNECT the first bytes are peeked: a TLS ClientHello whose SNI
  differs from the CONNECT name is refused (no domain fronting).
- **transparent TLS**: raw TLS from clients that ignore proxy settings; the ClientHello's SNI is
  read (not consumed) and decides the destination, dialled on ``transparent_tls_port``.
- **transparent HTTP**: plain HTTP routed by its ``Host`` header, dialled on
  ``transparent_http_port``.

Every destination is a name that is allowlisted and resolved by :class:`EgressResolver` (the proxy
dials only addresses it got from there, so private ranges are refused unless ``allow_private``);
IP literals are refused unless in ``allowed_cidrs``. Refusals are immediate: ``403`` with a
``text/plain`` body naming the rule (header ``X-Sbx-Egress-Rule``) for HTTP/CONNECT, a TLS alert
then close for SNI. HTTP requests are forwarded one per connection (``Connection: close``), framed
by ``h11``, so a second, differently addressed request cannot ride on an allowed connection.

TLS to a secret's host is terminated with a leaf from :class:`SandboxCA`; the request headers get
the placeholders swapped for real values; the request is re-encrypted to the real server, whose
certificate is verified (host trust store, plus ``upstream_ca_file``). Responses are relayed byte
for byte. TLS to any other host is relayed untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import h11

from exec_sandbox.egress.accounting import (
    ByteCapExceeded,
    EgressLog,
    EgressLogEntry,
    EgressStats,
    Mode,
    TokenBucket,
)
from exec_sandbox.egress.httpio import (
    HOP_BY_HOP,
    Refused,
    check_host_header,
    next_request,
    refusal_response,
    response_head,
    run_both,
    split_host_port,
)
from exec_sandbox.egress.policy import EgressPolicy, IPAddress, SecretPlaceholders, normalize_hostname
from exec_sandbox.egress.resolver import EgressResolver
from exec_sandbox.egress.secrets import SandboxCA
from exec_sandbox.egress.streams import (
    TLS_ALERT_ACCESS_DENIED,
    TLS_ALERT_UNRECOGNIZED_NAME,
    ByteStream,
    ClientHelloError,
    PlainStream,
    TlsStream,
    read_client_hello,
)

__all__ = ["EgressProxy", "ProxyAddresses", "Refused"]

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT = 5.0
_RELAY_CHUNK = 256 * 1024  # bounded: at most this much per direction is in flight in the proxy
OriginalDst = Callable[[asyncio.StreamWriter], tuple[str, int] | None]


@dataclass(frozen=True)
class ProxyAddresses:
    """Where each listener is bound: ``(host, port)`` each."""

    forward: tuple[str, int]
    tls: tuple[str, int]
    http: tuple[str, int]


@dataclass
class _Conn:
    start: float
    mode: Mode
    name: str = "?"
    port: int = 0
    intercepted: bool = False
    tunnel: bool = False  # a CONNECT was answered 200: refusals are TLS alerts from now on
    responded: bool = False  # the refusal was already sent (inside TLS)
    last_activity: float = field(default_factory=time.monotonic)
    bytes_in: int = 0
    bytes_out: int = 0


class EgressProxy:
    """Egress for one sandbox; ``async with`` or :meth:`start` / :meth:`aclose`."""

    def __init__(self, policy: EgressPolicy, resolver: EgressResolver, *,
                 placeholders: SecretPlaceholders | None = None, ca: SandboxCA | None = None,
                 upstream_ca_file: str | Path | None = None, log_size: int = 1024,
                 transparent_tls_port: int = 443, transparent_http_port: int = 80,
                 original_dst: OriginalDst | None = None, idle_timeout: float = 300.0) -> None:
        self.policy, self.resolver = policy, resolver
        self.placeholders = placeholders if placeholders is not None else SecretPlaceholders(policy)
        hosts = policy.secret_hosts()
        self.ca = ca if ca is not None else (SandboxCA(hosts) if hosts else None)
        self._upstream_ssl = ssl.create_default_context()
        if upstream_ca_file is not None:
            self._upstream_ssl.load_verify_locations(cafile=str(upstream_ca_file))
        self._upstream_ssl.set_alpn_protocols(["http/1.1"])
        self.transparent_tls_port, self.transparent_http_port = transparent_tls_port, transparent_http_port
        self.original_dst = original_dst
        self.idle_timeout = idle_timeout  # a relayed connection silent both ways this long is closed
        self.log = EgressLog(log_size)
        self.stats = EgressStats()
        lim = policy.limits
        self._bucket_in = TokenBucket(lim.bandwidth_bytes_per_s) if lim.bandwidth_bytes_per_s else None
        self._bucket_out = TokenBucket(lim.bandwidth_bytes_per_s) if lim.bandwidth_bytes_per_s else None
        self._servers: list[asyncio.Server] = []
        self._exhausted: str | None = None  # a byte cap was hit: every new connection is refused
        self._tasks: set[asyncio.Task[None]] = set()
        self.addresses: ProxyAddresses | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", *, forward_port: int = 0, tls_port: int = 0,
                    http_port: int = 0) -> ProxyAddresses:
        """Bind the three listeners; a second call returns the same addresses."""
        if self.addresses is not None:
            return self.addresses
        bound: list[tuple[str, int]] = []
        try:
            for handler, port in ((self._on_forward, forward_port), (self._on_tls, tls_port),
                                  (self._on_http, http_port)):
                server = await asyncio.start_server(self._wrap(handler), host, port, limit=64 * 1024)
                self._servers.append(server)
                sock = server.sockets[0].getsockname()
                bound.append((host, int(sock[1])))
        except BaseException:
            await self.aclose()
            raise
        self.addresses = ProxyAddresses(*bound)
        return self.addresses

    async def start_unix(self, directory: Path) -> dict[str, Path]:
        """Bind the three listeners as Unix sockets ``forward.sock``, ``tls.sock``, ``http.sock`` in
        ``directory`` (private to its owner: only processes of this user reach them)."""
        paths = {name: directory / f"{name}.sock" for name in ("forward", "tls", "http")}
        try:
            handlers = ((self._on_forward, "forward"), (self._on_tls, "tls"), (self._on_http, "http"))
            for handler, name in handlers:
                server = await asyncio.start_unix_server(self._wrap(handler), str(paths[name]),
                                                         limit=64 * 1024)
                self._servers.append(server)
        except BaseException:
            await self.aclose()
            raise
        return paths

    async def aclose(self) -> None:
        """Stop listening and cut every relayed connection; idempotent."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self.addresses = None

    async def __aenter__(self) -> EgressProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _wrap(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter, _Conn], Awaitable[None]],
              ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        modes: dict[str, Mode] = {"_on_forward": "http", "_on_tls": "sni", "_on_http": "host"}
        mode = modes[handler.__name__]

        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            conn = _Conn(start=time.time(), mode=mode)
            self.stats.connections_total += 1
            self.stats.active_connections += 1
            try:
                if self.stats.active_connections > self.policy.limits.max_connections:
                    raise Refused("connection_limit",
                                  f"max_connections ({self.policy.limits.max_connections}) reached")
                await handler(reader, writer, conn)
                self._record(conn, None)
            except Refused as exc:
                self._record(conn, exc)
                with contextlib.suppress(Exception):
                    if conn.responded or exc.rule == "idle_timeout":
                        pass
                    elif conn.mode == "sni" or conn.tunnel:
                        alert = (TLS_ALERT_UNRECOGNIZED_NAME if exc.rule == "not_allowlisted"
                                 else TLS_ALERT_ACCESS_DENIED)
                        writer.write(alert)
                    elif conn.bytes_in == 0:
                        writer.write(refusal_response(exc))
                    await asyncio.wait_for(writer.drain(), 2)
            except ByteCapExceeded as exc:
                self._record(conn, Refused("byte_limit", str(exc)))
            except (ConnectionError, OSError, TimeoutError, ssl.SSLError, h11.ProtocolError,
                    ClientHelloError) as exc:
                self._record(conn, None, error=f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug here must not take the listener down or go unlogged
                logger.exception("egress proxy: connection handler failed")
                self._record(conn, None, error=f"internal error: {type(exc).__name__}")
            except asyncio.CancelledError:
                # only aclose() cancels these root tasks; asyncio's stream callback (3.11) would log
                # a cancelled handler as an error, so the handler ends quietly
                self._record(conn, None, error="proxy closed")
            finally:
                self.stats.active_connections -= 1
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 2)
                self._tasks.discard(task)
        return run

    def _record(self, conn: _Conn, refused: Refused | None, error: str | None = None) -> None:
        if refused is not None:
            rules = self.stats.refused_by_rule
            rules[refused.rule] = rules.get(refused.rule, 0) + 1
            if refused.rule not in ("byte_limit", "idle_timeout"):
                self.stats.refused_total += 1
        self.log.append(EgressLogEntry(
            time=conn.start, name=conn.name, port=conn.port, mode=conn.mode,
            allowed=refused is None, rule=refused.rule if refused else None,
            reason=refused.reason if refused else error, intercepted=conn.intercepted,
            bytes_in=conn.bytes_in, bytes_out=conn.bytes_out, duration_s=time.time() - conn.start))

    # -- decisions -----------------------------------------------------------------------------

    async def _decide(self, host: str, port: int, conn: _Conn) -> list[IPAddress]:
        """Addresses to dial for ``host:port``, or :class:`Refused`."""
        conn.name, conn.port = host, port
        why = self.policy.port_refusal(port)
        if why:
            raise Refused("port", why)
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            why = self.policy.ip_literal_refusal(literal)
            if why:
                raise Refused("ip_literal", why)
            return [literal]
        try:
            name = normalize_hostname(host)
        except ValueError as exc:
            raise Refused("bad_name", str(exc)) from None
        conn.name = name
        if self._exhausted:
            raise Refused("byte_limit", f"{self._exhausted} used up")
        if not self.policy.is_allowed(name):
            raise Refused("not_allowlisted", f"{name} is not in allowed_domains")
        res = await self.resolver.resolve(name)
        if not res.ok:
            raise Refused("private_address" if res.refused else "no_address", res.refusal())
        return res.addresses

    async def _dial(self, addresses: list[IPAddress], port: int, tls_name: str | None) -> PlainStream:
        last: Exception | None = None
        for ip in addresses:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    str(ip), port, ssl=self._upstream_ssl if tls_name else None,
                    server_hostname=tls_name, limit=_RELAY_CHUNK), _CONNECT_TIMEOUT)
                return PlainStream(reader, writer)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                last = exc
        raise Refused("connect_failed", f"could not connect to port {port}: {last}", 502)

    # -- listeners -----------------------------------------------------------------------------

    async def _on_forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          conn: _Conn) -> None:
        client = PlainStream(reader, writer)
        hconn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        request = await next_request(hconn, client)
        if request.method == b"CONNECT":
            conn.mode = "connect"
            host, port = split_host_port(request.target.decode("ascii", "replace"))
            addresses = await self._decide(host, port, conn)
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
            leftover = hconn.trailing_data[0]
            await self._after_connect(PlainStream(reader, writer, leftover), conn, addresses, port)
            return
        url = urlsplit(request.target.decode("ascii", "replace"))
        if url.scheme != "http" or not url.hostname:
            raise Refused("bad_request", "only absolute http:// URIs and CONNECT are proxied", 400)
        host = url.hostname
        try:
            port = url.port or 80
        except ValueError:
            raise Refused("port", f"bad port in {url.netloc!r}", 400) from None
        addresses = await self._decide(host, port, conn)
        check_host_header(request, conn.name)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        upstream = await self._dial(addresses, port, None)
        await self._forward_http(hconn, client, request, target.encode(), upstream, conn, [])

    async def _after_connect(self, client: PlainStream, conn: _Conn, addresses: list[IPAddress],
                             port: int) -> None:
        conn.tunnel = True
        first = client.take_prefix()
        if not first:
            try:
                first = await asyncio.wait_for(client.reader.read(64 * 1024), 1.0)
            except TimeoutError:
                first = b""  # a server-speaks-first protocol: relay as is
        if first[:1] == b"\x16":
            hello, sni = await read_client_hello(client.reader, prefix=first)
            await self._tls_to(client, conn, hello, sni, addresses, port)
            return
        client.push_prefix(first)
        upstream = await self._dial(addresses, port, None)
        await self._relay(client, upstream, conn)

    async def _on_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn) -> None:
        hello, sni = await read_client_hello(reader)
        if not sni:
            raise Refused("no_sni", "TLS without SNI cannot be routed")
        port = self.transparent_tls_port
        addresses = await self._decide(sni, port, conn)
        if self.original_dst is not None:
            dst = self.original_dst(writer)
            if dst is not None and ipaddress.ip_address(dst[0]) not in self.resolver.handed_out(conn.name):
                raise Refused("domain_fronting", f"{dst[0]} was not resolved by us for {conn.name}")
            if dst is not None:
                port = dst[1]
        await self._tls_to(PlainStream(reader, writer), conn, hello, sni, addresses, port)

    async def _tls_to(self, client: PlainStream, conn: _Conn, hello: bytes, sni: str | None,
                      addresses: list[IPAddress], port: int) -> None:
        """Continue a TLS connection whose ClientHello (``hello``) was read from ``client``."""
        if sni is not None:
            try:
                same = normalize_hostname(sni) == conn.name
            except ValueError:
                same = False
            if not same:
                raise Refused("domain_fronting", f"TLS server name {sni!r} differs from {conn.name}")
        client.push_prefix(hello)
        if self.ca is not None and self.policy.needs_interception(conn.name):
            await self._intercept(client, conn, addresses, port)
            return
        upstream = await self._dial(addresses, port, None)
        await self._relay(client, upstream, conn)

    async def _on_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn) -> None:
        client = PlainStream(reader, writer)
        hconn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        request = await next_request(hconn, client)
        host_header = dict(request.headers).get(b"host", b"").decode("ascii", "replace")
        if not host_header:
            raise Refused("bad_request", "no Host header", 400)
        host, _ = split_host_port(host_header, self.transparent_http_port)
        addresses = await self._decide(host, self.transparent_http_port, conn)
        upstream = await self._dial(addresses, self.transparent_http_port, None)
        await self._forward_http(hconn, client, request, request.target, upstream, conn, [])

    # -- TLS termination for secret hosts --------------------------------------------------------

    async def _intercept(self, client: PlainStream, conn: _Conn, addresses: list[IPAddress],
                         port: int) -> None:
        assert self.ca is not None
        conn.intercepted = True
        ctx = await asyncio.get_running_loop().run_in_executor(None, self.ca.server_context, conn.name)
        tls = TlsStream(client, ctx, server_side=True)
        await tls.handshake()
        hconn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            request = await next_request(hconn, tls)
            check_host_header(request, conn.name, required=True)
            upstream = await self._dial(addresses, port, conn.name)
        except Refused as exc:
            conn.responded = True
            with contextlib.suppress(Exception):
                await tls.write(refusal_response(exc))
                await tls.write_eof()
            raise
        subs = self.placeholders.substitutions(conn.name)
        await self._forward_http(hconn, tls, request, request.target, upstream, conn, subs)

    # -- HTTP and byte relays ----------------------------------------------------------------------

    async def _forward_http(self, hconn: h11.Connection, client: ByteStream, request: h11.Request,
                            target: bytes, upstream: PlainStream, conn: _Conn,
                            subs: list[tuple[bytes, bytes]]) -> None:
        headers: list[tuple[bytes, bytes]] = []
        for key, value in request.headers:
            if key in HOP_BY_HOP:
                continue
            for placeholder, real in subs:
                value = value.replace(placeholder, real)
            headers.append((key, value))
        headers.append((b"connection", b"close"))
        out = h11.Connection(h11.CLIENT)
        to_send = [out.send(h11.Request(method=request.method, target=target or b"/", headers=headers))]

        async def send_body() -> None:
            for chunk in to_send:
                if chunk:
                    await self._count_write(upstream, chunk, conn, "out")
            while True:
                event = hconn.next_event()
                if event is h11.NEED_DATA:
                    hconn.receive_data(await client.read(64 * 1024))
                    continue
                if isinstance(event, h11.Data):
                    data = out.send(event)
                elif isinstance(event, h11.EndOfMessage):
                    data = out.send(h11.EndOfMessage())
                    if data:
                        await self._count_write(upstream, data, conn, "out")
                    return
                else:
                    return
                if data:
                    await self._count_write(upstream, data, conn, "out")

        async def receive() -> None:
            head = await response_head(upstream)
            if head:
                await self._count_write(client, head, conn, "in")
            await self._pump(upstream, client, conn, "in")

        try:
            await run_both(receive(), send_body())
        finally:
            await upstream.aclose()

    async def _relay(self, client: PlainStream, upstream: PlainStream, conn: _Conn) -> None:
        async def outbound() -> None:
            await self._pump(client, upstream, conn, "out")
            await upstream.write_eof()

        try:
            await run_both(self._pump(upstream, client, conn, "in"), outbound())
        finally:
            await upstream.aclose()

    async def _pump(self, src: ByteStream, dst: ByteStream, conn: _Conn, direction: str) -> None:
        while True:
            try:
                data = await asyncio.wait_for(src.read(_RELAY_CHUNK), self.idle_timeout)
            except TimeoutError:
                if time.monotonic() - conn.last_activity < self.idle_timeout:
                    continue  # the other direction is busy (e.g. a long download)
                raise Refused("idle_timeout", f"no bytes either way for {self.idle_timeout:g} s") from None
            if not data:
                return
            conn.last_activity = time.monotonic()
            await self._count_write(dst, data, conn, direction)

    async def _count_write(self, dst: ByteStream, data: bytes, conn: _Conn, direction: str) -> None:
        lim = self.policy.limits
        if direction == "in":
            cap = lim.max_bytes_in
            if cap is not None and self.stats.bytes_in + len(data) > cap:
                self._exhausted = self._exhausted or f"max_bytes_in ({cap} bytes)"
                raise ByteCapExceeded("in", cap)
            if self._bucket_in is not None:
                await self._bucket_in.take(len(data))
            self.stats.bytes_in += len(data)
            conn.bytes_in += len(data)
        else:
            cap = lim.max_bytes_out
            if cap is not None and self.stats.bytes_out + len(data) > cap:
                self._exhausted = self._exhausted or f"max_bytes_out ({cap} bytes)"
                raise ByteCapExceeded("out", cap)
            if self._bucket_out is not None:
                await self._bucket_out.take(len(data))
            self.stats.bytes_out += len(data)
            conn.bytes_out += len(data)
        await dst.write(data)
