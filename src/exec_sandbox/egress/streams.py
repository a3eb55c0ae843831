"""Byte streams the proxy relays between: plain asyncio streams, TLS over ``ssl.MemoryBIO``, and
a bounded TLS ClientHello reader that extracts the SNI without consuming it.

:class:`TlsStream` runs TLS on top of bytes already read (the peeked ClientHello is fed back in),
which is why the proxy uses ``ssl.MemoryBIO`` rather than ``loop.start_tls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Protocol

__all__ = ["ByteStream", "ClientHelloError", "PlainStream", "TlsStream", "parse_sni", "read_client_hello"]

_CHUNK = 64 * 1024
MAX_CLIENT_HELLO = 32 * 1024
TLS_ALERT_UNRECOGNIZED_NAME = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112])
TLS_ALERT_ACCESS_DENIED = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49])


class ClientHelloError(ValueError):
    """The bytes are not a (complete, bounded) TLS ClientHello."""


class ByteStream(Protocol):
    async def read(self, n: int = _CHUNK) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def write_eof(self) -> None: ...
    async def aclose(self) -> None: ...


class PlainStream:
    """An asyncio (reader, writer) pair, with ``prefix`` bytes to be read first."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 prefix: bytes = b"") -> None:
        self.reader, self.writer, self._prefix = reader, writer, prefix

    def take_prefix(self) -> bytes:
        data, self._prefix = self._prefix, b""
        return data

    def push_prefix(self, data: bytes) -> None:
        """Put ``data`` back in front of what is still to be read."""
        self._prefix = data + self._prefix

    async def read(self, n: int = _CHUNK) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            return data
        try:
            return await self.reader.read(n)
        except (ConnectionError, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def write_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


class TlsStream:
    """TLS (client or server side) over a :class:`PlainStream`, driven through memory BIOs."""

    def __init__(self, raw: PlainStream, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self.raw = raw
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                server_hostname=server_hostname)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self.raw.write(data)

    async def _fill(self) -> bool:
        data = await self.raw.read(_CHUNK)
        if data:
            self._in.write(data)
            return True
        self._in.write_eof()
        return False

    async def handshake(self, timeout: float = 10.0) -> None:
        """Complete the handshake (alerts are flushed to the peer before an error propagates)."""
        async def run() -> None:
            while True:
                try:
                    self.obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._flush()
                    if not await self._fill():
                        raise ConnectionError("peer closed during the TLS handshake") from None
                except ssl.SSLError:
                    with contextlib.suppress(Exception):
                        await self._flush()
                    raise
            await self._flush()
        await asyncio.wait_for(run(), timeout)

    async def read(self, n: int = _CHUNK) -> bytes:
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    with contextlib.suppress(ssl.SSLError):
                        return self.obj.read(n)
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self.obj.write(view[:_CHUNK])
            view = view[written:]
            await self._flush()

    async def write_eof(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self.obj.unwrap()
        with contextlib.suppress(Exception):
            await self._flush()

    async def aclose(self) -> None:
        await self.raw.aclose()


def parse_sni(hello: bytes) -> str | None:
    """The server name in a complete ClientHello handshake message (record headers stripped)."""
    try:
        if hello[0] != 1:
            raise ClientHelloError("not a ClientHello")
        pos = 4 + 2 + 32
        pos += 1 + hello[pos]  # session id
        pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")  # cipher suites
        pos += 1 + hello[pos]  # compression methods
        if pos >= len(hello):
            return None
        end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            ext_type = int.from_bytes(hello[pos:pos + 2], "big")
            ext_len = int.from_bytes(hello[pos + 2:pos + 4], "big")
            body = hello[pos + 4:pos + 4 + ext_len]
            pos += 4 + ext_len
            if ext_type != 0:
                continue
            i = 2
            while i + 3 <= len(body):
                kind, length = body[i], int.from_bytes(body[i + 1:i + 3], "big")
                if kind == 0:
                    return body[i + 3:i + 3 + length].decode("ascii")
                i += 3 + length
            return None
    except (IndexError, UnicodeDecodeError) as exc:
        raise ClientHelloError(f"malformed ClientHello: {exc}") from None
    return None


async def read_client_hello(reader: asyncio.StreamReader, timeout: float = 10.0,
                            prefix: bytes = b"") -> tuple[bytes, str | None]:
    """Read TLS records until the ClientHello is complete: (every byte read, SNI or ``None``).

    ``prefix`` is bytes already taken from ``reader``. The returned bytes include them and may run
    past the hello; they are meant to be replayed in front of the stream. Raises
    :class:`ClientHelloError` for non-TLS input or a hello over 32 KiB.
    """
    raw = bytearray(prefix)

    async def need(n: int) -> None:
        while len(raw) < n:
            if len(raw) > MAX_CLIENT_HELLO:
                raise ClientHelloError("ClientHello too large")
            data = await reader.read(16 * 1024)
            if not data:
                raise ClientHelloError("connection closed before the ClientHello was complete")
            raw.extend(data)

    async def run() -> bytes:
        handshake = bytearray()
        pos = 0
        while True:
            await need(pos + 5)
            header = raw[pos:pos + 5]
            if header[0] != 0x16 or header[1] != 0x03:
                raise ClientHelloError("not a TLS handshake record")
            length = int.from_bytes(header[3:5], "big")
            if pos + 5 + length > MAX_CLIENT_HELLO:
                raise ClientHelloError("ClientHello too large")
            await need(pos + 5 + length)
            handshake.extend(raw[pos + 5:pos + 5 + length])
            pos += 5 + length
            if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
                return bytes(handshake)

    try:
        handshake = await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise ClientHelloError("no ClientHello in time") from None
    return bytes(raw), parse_sni(handshake)
