"""Egress from inside a real VM: first byte and a 100 MiB download through the sandbox's gateway.

One command::

    PYTHONPATH=src .venv/bin/python bench/egress_vm.py [-n 30] [--mib 100] [--json PATH]

A networked session (``allowed_domains=["bench.test"]`` mapped to 127.0.0.1, the server a local
HTTP server in this process) runs the client in the guest: each sample is a new connection from
the guest's ``urllib`` through ``HTTP_PROXY`` - guest TCP -> slirp ``guestfwd`` -> a ``socat``
connector -> the gateway's forward proxy -> the server - timed to the first response byte inside
the guest. The baseline, measured in the same run, is the same request made directly on the host
(a new connection each time). Then one ``--mib`` download, in the guest through the gateway and
on the host directly. Prints median / p95 (ms), the ratio to the baseline, and MiB/s. Under TCG
the guest's own CPU is emulated: the ratio is what a sandbox's network costs here, not the proxy
alone (``bench/egress.py`` measures the proxy alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from bench.percentile import p95  # noqa: E402

NAME = "bench.test"

GUEST = r'''
import json, time, urllib.request
def first_byte(url):
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as resp:
        resp.read(1)
        took = time.perf_counter() - t
        resp.read()
    return took * 1000
fb = [first_byte(f"http://{NAME}:{PORT}/say/x") for _ in range(N)]
t = time.perf_counter()
got = 0
with urllib.request.urlopen(f"http://{NAME}:{PORT}/bytes/{SIZE}", timeout=600) as resp:
    while chunk := resp.read(1 << 20):
        got += len(chunk)
secs = time.perf_counter() - t
print(json.dumps({"first_byte_ms": fb, "bytes": got, "seconds": secs}))
'''


def _host_first_byte(port: int) -> float:
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET /say/x HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        sock.recv(1)
        took = time.perf_counter() - t
        while sock.recv(65536):
            pass
    return took * 1000


def _host_download(port: int, size: int) -> float:
    t = time.perf_counter()
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
    return (got / 2**20) / (time.perf_counter() - t)


async def main(n: int, mib: int) -> dict[str, Any]:
    from tests.integration.egress_support import local_server

    from exec_sandbox import Scheduler, SchedulerConfig

    size = mib * 2**20
    with local_server() as server:
        config = SchedulerConfig(allowed_domains=[NAME], host_overrides={NAME: "127.0.0.1"},
                                 egress_allow_private=True)
        async with Scheduler(config) as scheduler, await scheduler.session() as session:
            code = f"NAME, PORT, N, SIZE = {NAME!r}, {server.port}, {n}, {size}\n" + GUEST
            result = await session.exec(code, timeout_seconds=1800)
            if result.exit_code != 0:
                raise SystemExit(f"guest failed: {result.stderr}")
            guest = json.loads(result.stdout.strip().splitlines()[-1])
            stats = session.egress_stats
        host_fb = sorted([await asyncio.to_thread(_host_first_byte, server.port) for _ in range(n)])
        host_mibs = await asyncio.to_thread(_host_download, server.port, size)
    guest_fb = sorted(guest["first_byte_ms"])
    guest_mibs = (guest["bytes"] / 2**20) / guest["seconds"]
    out = {
        "n": n,
        "mib": mib,
        "host_direct": {"median_ms": statistics.median(host_fb), "p95_ms": p95(host_fb),
                        "mib_s": host_mibs},
        "guest_via_gateway": {"median_ms": statistics.median(guest_fb), "p95_ms": p95(guest_fb),
                              "mib_s": guest_mibs},
        "first_byte_ratio": statistics.median(guest_fb) / statistics.median(host_fb),
        "throughput_ratio": guest_mibs / host_mibs,
        "gateway_bytes_in": stats.bytes_in if stats else None,
    }
    print(f"{'mode':<34} {'first byte median':>18} {'p95':>9} {'ratio':>7} {mib} MiB")
    rows = (("host direct (baseline)", "host_direct"), ("guest -> gateway -> server", "guest_via_gateway"))
    for label, key in rows:
        row = out[key]
        ratio = 1.0 if key == "host_direct" else out["first_byte_ratio"]
        print(f"{label:<34} {row['median_ms']:>15.2f} ms {row['p95_ms']:>6.2f} ms {ratio:>6.2f}x "
              f"{row['mib_s']:>7.1f} MiB/s")
    print(f"throughput ratio guest/host: {out['throughput_ratio']:.3f}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=30, help="first-byte samples per mode")
    parser.add_argument("--mib", type=int, default=100, help="download size, MiB")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    figures = asyncio.run(main(args.n, args.mib))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
