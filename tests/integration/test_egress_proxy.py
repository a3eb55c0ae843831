"""The egress proxy against real HTTP/HTTPS servers on 127.0.0.1, driven by urllib, curl and httpx.

Every allowlisted name is mapped to 127.0.0.1 with host_overrides; tests that must reach the local
servers set allow_private=True (the base policy), and one test shows that without it they are refused.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

from exec_sandbox.egress import EgressGateway, EgressProxy, EgressResolver
from tests.integration.egress_support import (
    LocalServer,
    TestCA,
    base_policy,
    gateway,
    http_server,
    https_server,
    proxy_url,
    run_curl,
    settled,
    test_ca,
)

__all__ = ["http_server", "https_server", "test_ca"]

pytestmark = pytest.mark.timeout(60)

REFUSAL_BOUND_S = 2.0  # correctness bound from the issue: refusals are fast, never a hang


def _opener(gw: EgressGateway, bundle: Path | None = None) -> urllib.request.OpenerDirector:
    proxies = {"http": proxy_url(gw), "https": proxy_url(gw)}
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler(proxies)]
    if bundle is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(bundle))))
    return urllib.request.build_opener(*handlers)


def _get(opener: urllib.request.OpenerDirector, url: str) -> tuple[int, bytes]:
    try:
        with opener.open(url, timeout=20) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_urllib_http_and_https_through_the_proxy(
        test_ca: TestCA, tmp_path: Path, http_server: LocalServer, https_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path) as (gw, bundle):
        opener = _opener(gw, bundle)
        status, body = await asyncio.to_thread(_get, opener, http_server.url("web.test", "/plain"))
        assert (status, body) == (200, f"hello web.test:{http_server.port} /plain\n".encode())
        status, body = await asyncio.to_thread(_get, opener, https_server.url("other.test", "/tls"))
        assert status == 200 and body.startswith(b"hello other.test")
        await settled(gw, 2)
        log = gw.egress_log()
        assert [(e.mode, e.name, e.allowed) for e in log] == [("http", "web.test", True),
                                                              ("connect", "other.test", True)]
        assert log[1].bytes_in > 0 and log[1].bytes_out > 0 and not log[1].intercepted


async def test_curl_forward_proxy_and_transparent_modes(
        test_ca: TestCA, tmp_path: Path, http_server: LocalServer, https_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path, transparent_tls_port=https_server.port,
                       transparent_http_port=http_server.port) as (gw, bundle):
        assert gw.proxy_addresses is not None
        rc, out, err = await run_curl("--proxy", proxy_url(gw), http_server.url("web.test", "/c1"))
        assert rc == 0 and out.startswith("hello web.test"), err
        rc, out, err = await run_curl("--proxy", proxy_url(gw), "--cacert", str(bundle),
                                      https_server.url("other.test", "/c2"))
        assert rc == 0 and out.startswith("hello other.test"), err
        # transparent TLS: curl ignores any proxy, connects straight to the SNI listener
        tls_port = gw.proxy_addresses.tls[1]
        rc, out, err = await run_curl("--resolve", f"other.test:{tls_port}:127.0.0.1",
                                      "--cacert", str(bundle), f"https://other.test:{tls_port}/sni")
        assert rc == 0 and out.startswith("hello other.test"), err
        # transparent plain HTTP, routed by Host
        http_port = gw.proxy_addresses.http[1]
        rc, out, err = await run_curl("--resolve", f"web.test:{http_port}:127.0.0.1",
                                      f"http://web.test:{http_port}/host")
        assert rc == 0 and out.startswith("hello web.test"), err
        # a name outside the allowlist on the SNI listener: a TLS alert, fast
        start = time.monotonic()
        rc, out, err = await run_curl("--resolve", f"evil.test:{tls_port}:127.0.0.1", "--cacert", str(bundle),
                                      f"https://evil.test:{tls_port}/")
        assert rc != 0 and time.monotonic() - start < REFUSAL_BOUND_S
        assert "unrecognized name" in err.lower() or "alert" in err.lower(), err
        await settled(gw, 5)
        modes = [(e.mode, e.name, e.allowed) for e in gw.egress_log()]
        assert modes == [("http", "web.test", True), ("connect", "other.test", True),
                         ("sni", "other.test", True), ("host", "web.test", True), ("sni", "evil.test", False)]


async def test_httpx_through_the_proxy(
        test_ca: TestCA, tmp_path: Path, http_server: LocalServer, https_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path) as (gw, bundle):
        ctx = ssl.create_default_context(cafile=str(bundle))
        async with httpx.AsyncClient(proxy=proxy_url(gw), verify=ctx, trust_env=False) as client:
            r = await client.get(https_server.url("other.test", "/hx"))
            assert r.status_code == 200 and r.text.startswith("hello other.test")
            r = await client.post(http_server.url("web.test", "/upload"), content=b"z" * 300_000)
            assert r.text == "got 300000 bytes\n"
            r = await client.get(http_server.url("evil.test", "/"))
            assert r.status_code == 403 and r.headers["x-sbx-egress-rule"] == "not_allowlisted"


async def test_other_names_refused_fast_and_clearly(test_ca: TestCA, tmp_path: Path,
                                                    http_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path) as (gw, bundle):
        opener = _opener(gw, bundle)
        for url in (f"http://evil.test:{http_server.port}/", "http://example.com/",
                    f"http://web.test.evil.test:{http_server.port}/"):
            start = time.monotonic()
            status, body = await asyncio.to_thread(_get, opener, url)
            assert time.monotonic() - start < REFUSAL_BOUND_S
            assert status == 403 and b"not_allowlisted" in body and b"not in allowed_domains" in body
        start = time.monotonic()
        with pytest.raises(urllib.error.URLError, match="403"):
            await asyncio.to_thread(opener.open, "https://evil.test/", timeout=20)
        assert time.monotonic() - start < REFUSAL_BOUND_S
        start = time.monotonic()
        rc, _, err = await run_curl("--proxy", proxy_url(gw), "https://evil.test/")
        assert rc != 0 and "403" in err and time.monotonic() - start < REFUSAL_BOUND_S
        assert http_server.seen == [] or all("evil" not in h.get("host", "") for _, h in http_server.seen)
        await settled(gw, 5)
        refused = gw.egress_log(allowed=False)
        assert len(refused) == 5 and {e.rule for e in refused} == {"not_allowlisted"}


async def test_ip_literals_refused(test_ca: TestCA, tmp_path: Path, http_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path) as (gw, _bundle):
        before = len(http_server.seen)
        async with httpx.AsyncClient(proxy=proxy_url(gw), trust_env=False) as client:
            r = await client.get(f"http://127.0.0.1:{http_server.port}/")
            assert r.status_code == 403 and r.headers["x-sbx-egress-rule"] == "ip_literal"
            assert "allowed_cidrs" in r.text
        assert gw.proxy_addresses is not None
        raw = f"GET http://[::1]:{http_server.port}/ HTTP/1.1\r\nHost: [::1]\r\n\r\n".encode()
        resp = await asyncio.to_thread(_raw_proxy, gw.proxy_addresses.forward[1], raw)
        assert resp.startswith(b"HTTP/1.1 403") and b"ip_literal" in resp
        for target in (f"127.0.0.1:{http_server.port}", f"[::1]:{http_server.port}"):
            rc, _, err = await run_curl("--proxy", proxy_url(gw), "-p", f"http://{target}/")
            assert rc != 0 and "403" in err
        assert len(http_server.seen) == before


async def test_private_destination_refused_without_allow_private(
        test_ca: TestCA, tmp_path: Path, http_server: LocalServer, https_server: LocalServer) -> None:
    policy = base_policy(allow_private=False)
    async with gateway(test_ca, tmp_path, policy) as (gw, _bundle):
        before = len(http_server.seen) + len(https_server.seen)
        async with httpx.AsyncClient(proxy=proxy_url(gw), trust_env=False) as client:
            r = await client.get(http_server.url("web.test", "/"))
            assert r.status_code == 403 and r.headers["x-sbx-egress-rule"] == "private_address"
            assert "127.0.0.1" in r.text and "allow_private" in r.text
        rc, _, err = await run_curl("--proxy", proxy_url(gw), https_server.url("other.test", "/"))
        assert rc != 0 and "403" in err
        assert len(http_server.seen) + len(https_server.seen) == before


def _raw_proxy(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


async def test_domain_fronting_refused(test_ca: TestCA, tmp_path: Path, http_server: LocalServer,
                                       https_server: LocalServer) -> None:
    async with gateway(test_ca, tmp_path) as (gw, bundle):
        assert gw.proxy_addresses is not None
        port = gw.proxy_addresses.forward[1]
        # absolute URI for an allowed name, Host header for another
        req = (f"GET http://web.test:{http_server.port}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n").encode()
        resp = await asyncio.to_thread(_raw_proxy, port, req)
        assert resp.startswith(b"HTTP/1.1 403") and b"domain_fronting" in resp
        # CONNECT to an allowed name, then a ClientHello naming another one
        def fronted() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                head = f"CONNECT other.test:{https_server.port} HTTP/1.1\r\nHost: other.test\r\n\r\n"
                sock.sendall(head.encode())
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
                ctx = ssl.create_default_context(cafile=str(bundle))
                ctx.check_hostname = False
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    ctx.wrap_socket(sock, server_hostname="evil.test")
        await asyncio.to_thread(fronted)
        await settled(gw, 2)
        rules = [e.rule for e in gw.egress_log(allowed=False)]
        assert rules == ["domain_fronting", "domain_fronting"]


async def test_transparent_original_destination_must_be_one_we_resolved(
        test_ca: TestCA, tmp_path: Path, https_server: LocalServer) -> None:
    # the VM wiring may pass the guest's original destination (e.g. SO_ORIGINAL_DST after a DNAT);
    # it must be an address our resolver handed out for the SNI name. The hook's answer is only
    # compared, never dialled.
    policy = base_policy()
    dst = {"value": ("127.0.0.1", https_server.port)}
    proxy = EgressProxy(policy, EgressResolver(policy), upstream_ca_file=test_ca.ca_file,
                        original_dst=lambda _writer: dst["value"])
    async with proxy:
        assert proxy.addresses is not None
        port = proxy.addresses.tls[1]
        args = ("--resolve", f"other.test:{port}:127.0.0.1", "--cacert", str(test_ca.ca_file),
                f"https://other.test:{port}/od")
        rc, out, err = await run_curl(*args)
        assert rc == 0 and out.startswith("hello other.test"), err
        dst["value"] = ("::1", https_server.port)  # never handed out for other.test
        rc, _, err = await run_curl(*args)
        assert rc != 0
        for _ in range(100):
            if len(proxy.log) == 2:
                break
            await asyncio.sleep(0.01)
        assert [e.rule for e in proxy.log.entries()] == [None, "domain_fronting"]


async def test_malformed_requests_get_a_clear_400(test_ca: TestCA, tmp_path: Path) -> None:
    async with gateway(test_ca, tmp_path) as (gw, _bundle):
        assert gw.proxy_addresses is not None
        port = gw.proxy_addresses.forward[1]
        cases = [
            (b"GET http://web.test:99999/ HTTP/1.1\r\nHost: web.test\r\n\r\n", b"port"),
            (b"GET https://web.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n", b"bad_request"),
            (b"CONNECT web.test HTTP/1.1\r\nHost: web.test\r\n\r\n", b"bad_request"),
            (b"CONNECT web.test:0 HTTP/1.1\r\nHost: web.test\r\n\r\n", b"port"),
            (b"\x00\x01garbage\r\n\r\n", b"bad_request"),
            (b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
             b"bad_request"),
        ]
        for payload, rule in cases:
            resp = await asyncio.to_thread(_raw_proxy, port, payload)
            assert resp.startswith(b"HTTP/1.1 400"), (payload[:40], resp)
            assert b"X-Sbx-Egress-Rule: " + rule in resp, (payload[:40], resp)
        await settled(gw, len(cases))
        assert all(not e.allowed for e in gw.egress_log())


async def test_gateway_lifecycle(test_ca: TestCA, tmp_path: Path) -> None:
    gw = EgressGateway(base_policy())
    await gw.start()
    assert gw.proxy_addresses is not None and gw.dns_address is not None
    first = gw.proxy_addresses
    await gw.proxy.start()  # a second start is a no-op
    assert gw.proxy.addresses == first
    ports = [first.forward[1], first.tls[1], first.http[1]]
    await gw.aclose()
    await gw.aclose()  # idempotent
    assert gw.proxy_addresses is None
    for port in ports:  # nothing listens any more
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
