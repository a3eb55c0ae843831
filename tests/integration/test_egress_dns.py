"""The guest's DNS server, with an upstream DNS server the test runs on 127.0.0.1 counting queries."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from exec_sandbox.egress import DnsServer, DnsUpstream, EgressPolicy, EgressResolver
from tests.integration.egress_support import CountingDns, counting_dns

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[CountingDns, int]]:
    proto, port = await counting_dns()
    yield proto, port
    assert proto.transport is not None
    proto.transport.close()


async def _ask(port: int, name: str, rdtype: dns.rdatatype.RdataType = dns.rdatatype.A,
               tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return await dns.asyncquery.tcp(query, "127.0.0.1", port=port, timeout=5)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=5)


def _addresses(resp: dns.message.Message) -> list[str]:
    return [rd.address for rrset in resp.answer for rd in rrset]


async def test_allowlisted_names_resolve_through_the_upstream(upstream: tuple[CountingDns, int]) -> None:
    counter, port = upstream
    policy = EgressPolicy(allowed_domains=["web.test", "*.svc.test"], allow_private=True)
    resolver = EgressResolver(policy, DnsUpstream("127.0.0.1", port))
    async with DnsServer(resolver) as server:
        assert server.address is not None
        resp = await _ask(server.address[1], "web.test")
        assert resp.rcode() == dns.rcode.NOERROR and _addresses(resp) == ["127.0.0.1"]
        resp = await _ask(server.address[1], "a.svc.test", tcp=True)
        assert _addresses(resp) == ["127.0.0.1"]
        resp = await _ask(server.address[1], "web.test", dns.rdatatype.TXT)
        assert resp.rcode() == dns.rcode.NOERROR and resp.answer == []
    assert set(counter.queries) == {"web.test", "a.svc.test"}
    assert resolver.handed_out("web.test") == {ipaddress.ip_address("127.0.0.1")}


async def test_other_names_are_nxdomain_and_never_forwarded(upstream: tuple[CountingDns, int]) -> None:
    counter, port = upstream
    policy = EgressPolicy(allowed_domains=["web.test"], allow_private=True)
    resolver = EgressResolver(policy, DnsUpstream("127.0.0.1", port))
    async with DnsServer(resolver) as server:
        assert server.address is not None
        exfil = "c2VjcmV0LWRhdGE.chunk1.evil.test"  # data tunnelled in labels
        for name, rdtype, tcp in [("evil.test", dns.rdatatype.A, False), (exfil, dns.rdatatype.TXT, False),
                                  (exfil, dns.rdatatype.AAAA, True), ("x.web.test", dns.rdatatype.A, False),
                                  ("web.test.evil.test", dns.rdatatype.A, True)]:
            resp = await _ask(server.address[1], name, rdtype, tcp=tcp)
            assert resp.rcode() == dns.rcode.NXDOMAIN, name
            assert resp.answer == []
        await asyncio.sleep(0.1)
    assert counter.queries == []
    assert resolver.upstream_queries == 0


async def test_rebinding_defence_without_allow_private(upstream: tuple[CountingDns, int]) -> None:
    counter, port = upstream
    policy = EgressPolicy(allowed_domains=["web.test"], host_overrides={"pinned.test": "127.0.0.1"})
    resolver = EgressResolver(policy, DnsUpstream("127.0.0.1", port))
    async with DnsServer(resolver) as server:
        assert server.address is not None
        resp = await _ask(server.address[1], "web.test")  # upstream answers 127.0.0.1: dropped
        assert resp.rcode() == dns.rcode.NOERROR and resp.answer == []
    assert counter.queries == ["web.test", "web.test"]  # A + AAAA, once (then cached)
    result = await resolver.resolve("web.test")
    assert not result.ok and "allow_private" in result.refusal()
    assert resolver.handed_out("web.test") == set()


async def test_host_overrides_answer_without_upstream(upstream: tuple[CountingDns, int]) -> None:
    counter, port = upstream
    policy = EgressPolicy(allowed_domains=["web.test"], host_overrides={"web.test": ["127.0.0.1", "::1"]},
                          allow_private=True)
    resolver = EgressResolver(policy, DnsUpstream("127.0.0.1", port))
    async with DnsServer(resolver) as server:
        assert server.address is not None
        assert _addresses(await _ask(server.address[1], "WEB.test")) == ["127.0.0.1"]
        assert _addresses(await _ask(server.address[1], "web.test", dns.rdatatype.AAAA)) == ["::1"]
    assert counter.queries == []


async def test_garbage_is_dropped_and_server_survives(upstream: tuple[CountingDns, int]) -> None:
    _counter, port = upstream
    policy = EgressPolicy(allowed_domains=["web.test"], host_overrides={"web.test": "127.0.0.1"},
                          allow_private=True)
    async with DnsServer(EgressResolver(policy, DnsUpstream("127.0.0.1", port))) as server:
        assert server.address is not None
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                           remote_addr=("127.0.0.1", server.address[1]))
        for junk in (b"", b"\x00", b"\xff" * 600, bytes(range(256))):
            transport.sendto(junk)
        transport.close()
        await asyncio.sleep(0.05)
        assert _addresses(await _ask(server.address[1], "web.test")) == ["127.0.0.1"]


async def test_system_upstream_is_the_hosts_resolver() -> None:
    # "localhost" resolves through /etc/hosts on every host: loopback only, nothing leaves the machine
    loose = EgressResolver(EgressPolicy(allowed_domains=["localhost"], allow_private=True))
    result = await loose.resolve("localhost")
    assert result.ok and all(ip.is_loopback for ip in result.addresses)
    strict = EgressResolver(EgressPolicy(allowed_domains=["localhost"]))
    result = await strict.resolve("localhost")
    assert not result.ok and result.refused and "loopback" in result.refusal()
    refused = await strict.resolve("not-allowed.invalid")
    assert not refused.ok and "not in allowed_domains" in refused.refusal()
    assert strict.upstream_queries == 1  # only the allowlisted name was looked up
