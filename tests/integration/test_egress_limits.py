"""Per-sandbox limits (connections, bytes, bandwidth) and the egress log, against real local servers."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import httpx
import pytest

from exec_sandbox.egress import EgressLimits
from tests.integration.egress_support import (
    LocalServer,
    TestCA,
    base_policy,
    gateway,
    http_server,
    https_server,
    proxy_url,
    settled,
    test_ca,
)

__all__ = ["http_server", "https_server", "test_ca"]

pytestmark = pytest.mark.timeout(60)


async def test_connection_cap(test_ca: TestCA, tmp_path: Path, https_server: LocalServer) -> None:
    policy = base_policy(limits=EgressLimits(max_connections=2))
    async with gateway(test_ca, tmp_path, policy) as (gw, _bundle):
        assert gw.proxy_addresses is not None
        host, port = gw.proxy_addresses.forward
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(host, port)
            head = f"CONNECT other.test:{https_server.port} HTTP/1.1\r\nHost: other.test\r\n\r\n"
            writer.write(head.encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            held.append((reader, writer))
        start = time.monotonic()
        async with httpx.AsyncClient(proxy=proxy_url(gw), trust_env=False) as client:
            r = await client.get("http://web.test/")
        assert r.status_code == 403 and r.headers["x-sbx-egress-rule"] == "connection_limit"
        assert time.monotonic() - start < 2.0
        assert gw.stats.active_connections == 2
        for _reader, writer in held:
            writer.close()
            await writer.wait_closed()
        for _ in range(100):
            if gw.stats.active_connections == 0:
                break
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(proxy=proxy_url(gw), trust_env=False) as client:
            r = await client.get("http://web.test:1/")
            assert r.headers.get("x-sbx-egress-rule") != "connection_limit"


async def test_byte_caps(test_ca: TestCA, tmp_path: Path, http_server: LocalServer) -> None:
    policy = base_policy(limits=EgressLimits(max_bytes_in=1_000_000, max_bytes_out=200_000))
    async with gateway(test_ca, tmp_path, policy) as (gw, _bundle):
        async with httpx.AsyncClient(proxy=proxy_url(gw), trust_env=False) as client:
            r = await client.get(http_server.url("web.test", "/bytes/100000"))
            assert r.status_code == 200 and len(r.content) == 100_000
            with pytest.raises(httpx.HTTPError):  # cut off mid-body at the cap
                await client.get(http_server.url("web.test", "/bytes/5000000"))
            assert gw.stats.bytes_in <= 1_000_000
            r = await client.get(http_server.url("web.test", "/bytes/10"))
            assert r.status_code == 403 and r.headers["x-sbx-egress-rule"] == "byte_limit"
        await settled(gw, 3)
        rules = [e.rule for e in gw.egress_log()]
        assert rules == [None, "byte_limit", "byte_limit"]
    policy = base_policy(limits=EgressLimits(max_bytes_out=200_000))
    async with gateway(test_ca, tmp_path, policy) as (gw, _bundle):
        async with httpx.AsyncClient(proxy=proxy_url(gw), trust_env=False) as client:
            with pytest.raises(httpx.HTTPError):
                await client.post(http_server.url("web.test", "/up"), content=b"u" * 1_000_000)
        await settled(gw, 1)
        assert gw.stats.bytes_out <= 200_000
        assert gw.egress_log()[-1].rule == "byte_limit"


async def test_bandwidth_token_bucket(test_ca: TestCA, tmp_path: Path, http_server: LocalServer) -> None:
    policy = base_policy(limits=EgressLimits(bandwidth_bytes_per_s=1_000_000))
    async with gateway(test_ca, tmp_path, policy) as (gw, _bundle):
        async with httpx.AsyncClient(proxy=proxy_url(gw), trust_env=False) as client:
            start = time.monotonic()
            r = await client.get(http_server.url("web.test", "/bytes/1500000"))
            elapsed = time.monotonic() - start
        assert len(r.content) == 1_500_000
        assert elapsed >= 0.4  # burst of 1 MB, then ~0.5 s for the rest at 1 MB/s (a lower bound only)


async def test_egress_log_lists_allowed_and_refused(test_ca: TestCA, tmp_path: Path,
                                                   http_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path, log_size=3) as (gw, _bundle):
        t0 = time.time()
        async with httpx.AsyncClient(proxy=proxy_url(gw), trust_env=False) as client:
            await client.get(http_server.url("web.test", "/a"))
            await client.get("http://evil.test/")
            await client.get(http_server.url("web.test", "/b"))
            await client.get("http://127.0.0.1/")
        await settled(gw, 4)
        entries = gw.egress_log()
        assert len(entries) == 3 and gw.proxy.log.dropped == 1  # a ring buffer
        assert [(e.name, e.allowed, e.rule) for e in entries] == [
            ("evil.test", False, "not_allowlisted"), ("web.test", True, None),
            ("127.0.0.1", False, "ip_literal")]
        assert entries[1].port == http_server.port and entries[1].bytes_in > 0 and entries[1].bytes_out > 0
        assert all(e.time >= t0 for e in entries)
        assert [e.name for e in gw.egress_log(allowed=False)] == ["evil.test", "127.0.0.1"]
        assert gw.stats.connections_total == 4 and gw.stats.refused_total == 2
        assert gw.stats.refused_by_rule == {"not_allowlisted": 1, "ip_literal": 1}


async def test_idle_connections_are_closed(test_ca: TestCA, tmp_path: Path,
                                           https_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path, idle_timeout=0.3) as (gw, _bundle):
        assert gw.proxy_addresses is not None
        reader, writer = await asyncio.open_connection(*gw.proxy_addresses.forward)
        writer.write(f"CONNECT other.test:{https_server.port} HTTP/1.1\r\nHost: other.test\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(b"\x00")  # not TLS: a raw relay, then silence
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await settled(gw, 1)
        assert gw.egress_log()[0].rule == "idle_timeout"


async def test_many_parallel_requests(test_ca: TestCA, tmp_path: Path, http_server: LocalServer,
                                      https_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path) as (gw, bundle):
        ctx = ssl.create_default_context(cafile=str(bundle))
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(proxy=proxy_url(gw), verify=ctx, trust_env=False,
                                     limits=limits) as client:
            urls = [http_server.url("web.test", f"/p{i}") for i in range(30)]
            urls += [https_server.url("api.test" if i % 2 else "other.test", f"/s{i}") for i in range(30)]
            responses = await asyncio.gather(*(client.get(u) for u in urls))
        assert all(r.status_code == 200 for r in responses)
        # end-to-end TLS tunnels may carry several requests (the client reuses them); intercepted
        # and plain HTTP ones carry one each
        await settled(gw, 45)
        assert len(gw.egress_log()) == gw.stats.connections_total and gw.stats.refused_total == 0
        assert sum(e.intercepted for e in gw.egress_log()) == 15
