"""Egress proxy overhead on 127.0.0.1: first byte and 100 MiB throughput, through the proxy vs direct.

One command::

    PYTHONPATH=src .venv/bin/python bench/egress.py [-n 200] [--mib 100] [--json PATH]

A local HTTP server and the egress proxy (``EgressGateway``, allowlisted name mapped to 127.0.0.1
with ``host_overrides``, ``allow_private=True``) each run in their own process; the client (blocking
sockets) runs here. Modes: ``direct`` (client -> server), ``forward`` (absolute-URI request through
the proxy: h11 framing, one request per connection) and ``connect`` (a CONNECT tunnel: the raw byte
relay used for end-to-end TLS). Each sample is a new TCP connection. Prints median and p95 of the
time to the first response byte (ms), the ratio to direct, and MiB/s for one ``--mib`` download.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
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


def _serve(queue: Any) -> None:
    from tests.integration.egress_support import local_server

    with local_server() as server:
        queue.put(server.port)
        time.sleep(3600)


def _proxy(queue: Any) -> None:
    from exec_sandbox.egress import EgressGateway, EgressPolicy

    async def main() -> None:
        policy = EgressPolicy(allowed_domains=[NAME], host_overrides={NAME: "127.0.0.1"}, allow_private=True)
        async with EgressGateway(policy, log_size=16) as gw:
            assert gw.proxy_addresses is not None
            queue.put(gw.proxy_addresses.forward[1])
            await asyncio.sleep(3600)

    asyncio.run(main())


def _request(mode: str, server_port: int, proxy_port: int, path: str) -> tuple[float, int, float]:
    """(seconds to first byte, body bytes, seconds for the whole response) for one new connection."""
    start = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", server_port if mode == "direct" else proxy_port))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "connect":
            sock.sendall(f"CONNECT {NAME}:{server_port} HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
        target = f"http://{NAME}:{server_port}{path}" if mode == "forward" else path
        request = f"GET {target} HTTP/1.1\r\nHost: {NAME}:{server_port}\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        first = sock.recv(65536)
        t_first = time.perf_counter() - start
        data = first
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        received = len(body)
        buf = bytearray(1 << 20)
        while received < length:
            n = sock.recv_into(buf)
            if not n:
                break
            received += n
        return t_first, received, time.perf_counter() - start
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="first-byte samples per mode")
    parser.add_argument("--mib", type=int, default=100, help="download size for throughput")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_serve, args=(queue,), daemon=True)]
    procs[0].start()
    server_port = int(queue.get(timeout=30))
    procs.append(ctx.Process(target=_proxy, args=(queue,), daemon=True))
    procs[1].start()
    proxy_port = int(queue.get(timeout=30))
    results: dict[str, Any] = {"n": args.n, "mib": args.mib}
    try:
        modes = ("direct", "forward", "connect")
        for mode in modes:  # warm up
            for _ in range(5):
                _request(mode, server_port, proxy_port, "/warm")
        samples: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.n):  # interleaved, so drift hits every mode alike
            for mode in modes:
                samples[mode].append(_request(mode, server_port, proxy_port, "/fb")[0] * 1000)
        size = args.mib * 1024 * 1024
        for mode in modes:
            ordered = sorted(samples[mode])
            _first, received, total = _request(mode, server_port, proxy_port, f"/bytes/{size}")
            assert received == size, (mode, received)
            results[mode] = {"first_byte_ms_median": statistics.median(ordered),
                             "first_byte_ms_p95": p95(ordered), "throughput_mib_s": args.mib / total}
        direct = results["direct"]
        print(f"egress proxy on 127.0.0.1, {args.n} new connections per mode, {args.mib} MiB download")
        print(f"{'mode':<9}{'first byte median':>19}{'p95':>9}{'ratio':>8}{'MiB/s':>9}{'ratio':>8}")
        for mode in modes:
            r = results[mode]
            r["first_byte_ratio"] = r["first_byte_ms_median"] / direct["first_byte_ms_median"]
            r["throughput_ratio"] = r["throughput_mib_s"] / direct["throughput_mib_s"]
            print(f"{mode:<9}{r['first_byte_ms_median']:>16.3f} ms{r['first_byte_ms_p95']:>6.3f} ms"
                  f"{r['first_byte_ratio']:>7.2f}x{r['throughput_mib_s']:>9.0f}{r['throughput_ratio']:>7.2f}x")
    finally:
        for proc in procs:
            proc.terminate()
            proc.join(5)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
