"""Egress proxy overhead on 127.0.0.1: first byte and 100 MiB throughput, through the proxy vs direct.

One command::

    PYTHONPATH=src .venv/bin/python bench/egress.py [-n 200] [--mib 100] [--json PATH]

A local HTTP server and the egress proxy (``EgressGateway``, allowlisted name mapped to 127.0.0.1
with ``host_overrides``, ``allow_private=True``) each run in their own process; the client (blocking
sockets) runs here. Modes: ``direct`` (client -> server), ``forward`` (absolute-URI request through
the proxy: h11 framing, one request per connection) and ``connect`` (a CONNECT tunnel: the raw byte
relay used for end-to-end TLS); and over HTTPS (a test CA): ``tls-direct``, ``tls-connect`` (TLS
end to end through a CONNECT tunnel, relayed untouched) and ``tls-secret`` (a secret's host: the
proxy terminates TLS, swaps the placeholder, re-encrypts). Each sample is a new TCP connection (so
TLS modes include their handshakes). Prints median and p95 of the time to the first response byte
(ms), the ratio to the direct mode of the same protocol, and MiB/s for one ``--mib`` download.
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
SECRET_NAME = "secret.test"


def _serve(queue: Any, cert_file: str | None) -> None:
    import ssl

    from tests.integration.egress_support import local_server

    tls = None
    if cert_file:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert_file)
    with local_server(tls) as server:
        queue.put(server.port)
        time.sleep(3600)


def _proxy(queue: Any, ca_file: str) -> None:
    from exec_sandbox.egress import EgressGateway, EgressPolicy

    async def run() -> None:
        policy = EgressPolicy(allowed_domains=[NAME, SECRET_NAME], allow_private=True,
                              host_overrides={NAME: "127.0.0.1", SECRET_NAME: "127.0.0.1"},
                              secrets={"TOKEN": {"value": "bench-secret", "hosts": [SECRET_NAME]}})
        async with EgressGateway(policy, log_size=16, upstream_ca_file=ca_file) as gw:
            assert gw.proxy_addresses is not None and gw.ca_pem is not None
            queue.put((gw.proxy_addresses.forward[1], gw.ca_pem, gw.guest_env()["TOKEN"]))
            await asyncio.sleep(3600)

    asyncio.run(run())


def _request(mode: str, server_port: int, proxy_port: int, path: str,
             tls: Any = None, token: str = "") -> tuple[float, int, float]:
    """(seconds to first byte, body bytes, seconds for the whole response) for one new connection."""
    name = SECRET_NAME if mode == "tls-secret" else NAME
    direct = mode in ("direct", "tls-direct")
    start = time.perf_counter()
    sock: Any = socket.create_connection(("127.0.0.1", server_port if direct else proxy_port))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode in ("connect", "tls-connect", "tls-secret"):
            sock.sendall(f"CONNECT {name}:{server_port} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
        if mode.startswith("tls"):
            sock = tls.wrap_socket(sock, server_hostname=name)
        target = f"http://{NAME}:{server_port}{path}" if mode == "forward" else path
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        request = f"GET {target} HTTP/1.1\r\nHost: {name}:{server_port}\r\n{auth}Connection: close\r\n\r\n"
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
    import ssl
    import tempfile

    from tests.integration.egress_support import TestCA

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="first-byte samples per mode")
    parser.add_argument("--mib", type=int, default=100, help="download size for throughput")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workdir = tempfile.TemporaryDirectory()
    ca = TestCA(Path(workdir.name), [NAME, SECRET_NAME])
    procs = []
    ports: dict[str, Any] = {}
    for label, target, extra in (("http", _serve, None), ("https", _serve, str(ca.cert_file)),
                                 ("proxy", _proxy, str(ca.ca_file))):
        procs.append(ctx.Process(target=target, args=(queue, extra), daemon=True))
        procs[-1].start()
        ports[label] = queue.get(timeout=60)
    proxy_port, sandbox_ca_pem, token = ports["proxy"]
    tls = ssl.create_default_context(cadata=ca.ca_file.read_text() + sandbox_ca_pem.decode())
    results: dict[str, Any] = {"n": args.n, "mib": args.mib}
    modes = ("direct", "forward", "connect", "tls-direct", "tls-connect", "tls-secret")

    def one(mode: str, path: str) -> tuple[float, int, float]:
        port = ports["https" if mode.startswith("tls") else "http"]
        return _request(mode, port, proxy_port, path, tls, token if mode.startswith("tls") else "")

    try:
        for mode in modes:  # warm up (and mint the secret host's leaf once)
            for _ in range(5):
                one(mode, "/warm")
        samples: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.n):  # interleaved, so drift hits every mode alike
            for mode in modes:
                samples[mode].append(one(mode, "/fb")[0] * 1000)
        size = args.mib * 1024 * 1024
        for mode in modes:
            ordered = sorted(samples[mode])
            _first, received, total = one(mode, f"/bytes/{size}")
            assert received == size, (mode, received)
            results[mode] = {"first_byte_ms_median": statistics.median(ordered),
                             "first_byte_ms_p95": p95(ordered), "throughput_mib_s": args.mib / total}
        print(f"egress proxy on 127.0.0.1, {args.n} new connections per mode, {args.mib} MiB download")
        print(f"{'mode':<12}{'first byte median':>19}{'p95':>11}{'ratio':>8}{'MiB/s':>9}{'ratio':>8}")
        for mode in modes:
            r, base = results[mode], results["tls-direct" if mode.startswith("tls") else "direct"]
            r["first_byte_ratio"] = r["first_byte_ms_median"] / base["first_byte_ms_median"]
            r["throughput_ratio"] = r["throughput_mib_s"] / base["throughput_mib_s"]
            print(f"{mode:<12}{r['first_byte_ms_median']:>16.3f} ms{r['first_byte_ms_p95']:>8.3f} ms"
                  f"{r['first_byte_ratio']:>7.2f}x{r['throughput_mib_s']:>9.0f}{r['throughput_ratio']:>7.2f}x")
    finally:
        for proc in procs:
            proc.terminate()
            proc.join(5)
        workdir.cleanup()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
