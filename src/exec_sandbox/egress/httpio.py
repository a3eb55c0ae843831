"""HTTP/1.1 pieces of the egress proxy: refusals, request heads (``h11``), response heads, relays."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

import h11

from exec_sandbox.egress.policy import normalize_hostname
from exec_sandbox.egress.streams import ByteStream, PlainStream

__all__ = ["HEAD_TIMEOUT", "HOP_BY_HOP", "MAX_HEAD", "Refused", "check_host_header", "next_request",
           "refusal_response", "response_head", "run_both", "split_host_port"]

HEAD_TIMEOUT = 10.0
MAX_HEAD = 64 * 1024
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te",
                        b"trailer", b"upgrade"})


class Refused(Exception):
    """A connection the policy refuses: ``rule`` is machine-readable, the message is for the guest."""

    def __init__(self, rule: str, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.rule, self.reason, self.status = rule, reason, status


def split_host_port(target: str, default: int | None = None) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``host`` (then ``default``) -> (host, port), or :class:`Refused`."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif target.count(":") == 1:
        host, _, port_text = target.partition(":")
    else:
        host, port_text = target, ""
    if not port_text:
        if default is None:
            raise Refused("bad_request", f"no port in {target!r}", 400)
        return host, default
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise Refused("port", f"port {port_text!r} out of range", 400)
    return host, int(port_text)


async def run_both(receiver: Awaitable[None], sender: Awaitable[None]) -> None:
    """Run both directions; done when ``receiver`` ends; an error in either ends both."""
    recv, send = asyncio.ensure_future(receiver), asyncio.ensure_future(sender)
    try:
        pending: set[asyncio.Future[None]] = {recv, send}
        while recv in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raises the direction's error
    finally:
        for task in (recv, send):
            task.cancel()
        for task in (recv, send):
            with contextlib.suppress(BaseException):
                await task


def refusal_response(exc: Refused) -> bytes:
    body = f"egress refused ({exc.rule}): {exc.reason}\n".encode()
    phrase = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(exc.status, "Forbidden")
    return (f"HTTP/1.1 {exc.status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Sbx-Egress-Rule: {exc.rule}\r\n\r\n"
            ).encode() + body


async def next_request(hconn: h11.Connection, stream: ByteStream) -> h11.Request:
    """The request head (``h11``), at most :data:`MAX_HEAD` bytes within :data:`HEAD_TIMEOUT`."""
    async def run() -> h11.Request:
        received = 0
        while True:
            event = hconn.next_event()
            if event is h11.NEED_DATA:
                if received > MAX_HEAD:
                    raise Refused("bad_request", f"request head over {MAX_HEAD} bytes", 400)
                data = await stream.read(min(16 * 1024, MAX_HEAD + 1 - received))
                received += len(data)
                hconn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                return event
            raise Refused("bad_request", "no HTTP request", 400)
    try:
        return await asyncio.wait_for(run(), HEAD_TIMEOUT)
    except h11.RemoteProtocolError as exc:
        raise Refused("bad_request", f"malformed HTTP request: {exc}", 400) from None
    except TimeoutError:
        raise Refused("bad_request", "no complete HTTP request head in time", 400) from None


def check_host_header(request: h11.Request, name: str, *, required: bool = False) -> None:
    raw = dict(request.headers).get(b"host")
    if raw is None:
        if required:
            raise Refused("bad_request", "no Host header", 400)
        return
    host, _ = split_host_port(raw.decode("ascii", "replace"), 0)
    try:
        same = normalize_hostname(host) == name
    except ValueError:
        same = host.strip("[]") == name
    if not same:
        raise Refused("domain_fronting", f"Host {host!r} differs from the destination {name}")


async def response_head(upstream: PlainStream) -> bytes:
    """The response head with ``Connection: close`` (one request per connection), rest unread."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await upstream.read(64 * 1024)
        if not data:
            upstream.push_prefix(buf)
            return b""
        buf += data
        if len(buf) > 64 * 1024 and b"\r\n\r\n" not in buf:
            raise Refused("bad_response", "response head over 64 KiB", 502)
    head, _, rest = buf.partition(b"\r\n\r\n")
    upstream.push_prefix(rest)
    lines = head.split(b"\r\n")
    if lines[0][9:10] == b"1":  # 1xx: leave as is, the final head follows in the raw relay
        return head + b"\r\n\r\n"
    kept = [line for line in lines[1:]
            if line.split(b":", 1)[0].strip().lower() not in (b"connection", b"keep-alive",
                                                               b"proxy-connection")]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"
