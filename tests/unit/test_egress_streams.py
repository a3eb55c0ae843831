"""Pure tests of the ClientHello reader and the sandbox CA (in-memory TLS, no sockets)."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from exec_sandbox.egress.secrets import SandboxCA
from exec_sandbox.egress.streams import ClientHelloError, parse_sni, read_client_hello


def _client_hello(server_hostname: str | None) -> bytes:
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


async def _read(data: bytes, prefix: bytes = b"") -> tuple[bytes, str | None]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_client_hello(reader, timeout=2, prefix=prefix)


async def test_sni_is_read_without_losing_bytes() -> None:
    hello = _client_hello("api.example.com")
    raw, sni = await _read(hello[1:] + b"tail", prefix=hello[:1])
    assert sni == "api.example.com" and raw == hello + b"tail"  # everything read is handed back


async def test_hello_split_over_records() -> None:
    hello = _client_hello("split.example.com")
    body = hello[5:]
    records = b"".join(bytes([0x16, 0x03, 0x01]) + len(part).to_bytes(2, "big") + part
                       for part in (body[:100], body[100:]))
    raw, sni = await _read(records)
    assert sni == "split.example.com" and raw == records


async def test_no_sni() -> None:
    _raw, sni = await _read(_client_hello(None))
    assert sni is None


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00",
                                  b"\x16\x03\x01\xff\xff" + b"x" * 100, b""])
async def test_not_a_client_hello(data: bytes) -> None:
    with pytest.raises(ClientHelloError):
        await _read(data)


def test_parse_sni_rejects_garbage() -> None:
    with pytest.raises(ClientHelloError):
        parse_sni(b"\x01\x00\x00\x10" + b"\x03\x03")
    with pytest.raises(ClientHelloError):
        parse_sni(b"\x02" + b"\x00" * 50)


def test_sandbox_ca_leaf_is_trusted_for_its_hosts_only() -> None:
    ca = SandboxCA(["api.test", "*.svc.test"])
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    for name in ("api.test", "a.svc.test"):
        server = ca.server_context(name).wrap_bio(s_in := ssl.MemoryBIO(), s_out := ssl.MemoryBIO(),
                                                  server_side=True)
        client = client_ctx.wrap_bio(c_in := ssl.MemoryBIO(), c_out := ssl.MemoryBIO(), server_hostname=name)
        done = set()
        for _ in range(10):
            for side, obj, out, peer_in in (("c", client, c_out, s_in), ("s", server, s_out, c_in)):
                if side not in done:
                    try:
                        obj.do_handshake()
                        done.add(side)
                    except ssl.SSLWantReadError:
                        pass
                peer_in.write(out.read())
        assert done == {"c", "s"}
        assert ca.server_context(name) is ca.server_context(name)  # cached
    for other in ("other.test", "svc.test.evil", "x.api.test"):
        with pytest.raises(ValueError):
            ca.leaf_pem(other)
    assert b"PRIVATE KEY" not in ca.cert_pem
