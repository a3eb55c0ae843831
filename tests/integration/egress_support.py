"""Real servers for the egress tests, all on 127.0.0.1: HTTP, HTTPS (a test CA), a counting DNS server.

Nothing here ever connects anywhere but 127.0.0.1 / ::1.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import hashlib
import os
import ssl
import threading
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exec_sandbox.egress import EgressGateway, EgressPolicy, Secret

__all__ = ["NAMES", "SECRET_VALUE", "CountingDns", "LocalServer", "TestCA", "base_policy", "counting_dns",
           "gateway", "http_server", "https_server", "local_server", "package_index", "proxy_url", "run_curl",
           "settled", "test_ca", "wheel"]


class TestCA:
    """A throwaway 'public' CA standing in for the real web PKI, and one leaf for ``names``."""

    __test__ = False

    def __init__(self, directory: Path, names: list[str]) -> None:
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test CA")])
        ca = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(key, hashes.SHA256()))
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(subject).public_key(leaf_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .sign(key, hashes.SHA256()))
        self.ca_file = directory / "test-ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.cert_file = directory / "server.pem"
        self.cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file)
        return ctx


@dataclass
class LocalServer:
    """A threaded HTTP(S) server; ``seen`` records (path, headers) of every request."""

    port: int
    scheme: str
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def url(self, name: str, path: str = "/") -> str:
        return f"{self.scheme}://{name}:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    record: list[tuple[str, dict[str, str]]]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.record.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.path.startswith("/bytes/"):
            size = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * (256 * 1024)
            left = size
            while left > 0:
                self.wfile.write(chunk[:left])
                left -= len(chunk)
            return
        if self.path.startswith("/say/"):
            self._send(unquote(self.path[5:]).encode())
            return
        self._send(f"hello {self.headers.get('Host')} {self.path}\n".encode())

    def do_POST(self) -> None:
        self.record.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        self._send(f"got {len(data)} bytes\n".encode())


@contextmanager
def local_server(tls: ssl.SSLContext | None = None, host: str = "127.0.0.1", port: int = 0
                 ) -> Iterator[LocalServer]:
    seen: list[tuple[str, dict[str, str]]] = []
    handler = type("Handler", (_Handler,), {"record": seen})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield LocalServer(port=httpd.server_address[1], scheme="https" if tls else "http", seen=seen)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


class CountingDns(asyncio.DatagramProtocol):
    """An upstream DNS server on 127.0.0.1 answering A 127.0.0.1 for every name, counting queries."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        query = dns.message.from_wire(data)
        q = query.question[0]
        self.queries.append(q.name.to_text(omit_final_dot=True))
        resp = dns.message.make_response(query)
        if q.rdtype == dns.rdatatype.A:
            resp.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", "127.0.0.1"))
        assert self.transport is not None
        self.transport.sendto(resp.to_wire(), addr)


async def counting_dns(host: str = "127.0.0.1", port: int = 0) -> tuple[CountingDns, int]:
    loop = asyncio.get_running_loop()
    proto = CountingDns()
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=(host, port))
    return proto, int(transport.get_extra_info("sockname")[1])


def wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel, egress-demo 1.0."""
    name = "egress_demo-1.0-py3-none-any.whl"
    files = {
        "egress_demo/__init__.py": b"VALUE = 1\n",
        "egress_demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: egress-demo\nVersion: 1.0\n",
        "egress_demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append("egress_demo-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(directory / name, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr("egress_demo-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return directory / name


@contextmanager
def package_index(ca: TestCA, root: Path) -> Iterator[int]:
    """A package index (HTTPS with ``ca``) holding :func:`wheel`, on 127.0.0.1; yields its port."""
    (root / "simple" / "egress-demo").mkdir(parents=True)
    (root / "files").mkdir()
    built = wheel(root / "files")
    sha = hashlib.sha256(built.read_bytes()).hexdigest()
    (root / "simple" / "egress-demo" / "index.html").write_text(
        f'<html><body><a href="/files/{built.name}#sha256={sha}">{built.name}</a></body></html>\n')
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.socket = ca.server_context().wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


NAMES = ["web.test", "api.test", "other.test"]


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("egress-ca"), NAMES)


@pytest.fixture(scope="module")
def http_server() -> Iterator[LocalServer]:
    with local_server() as server:
        yield server


@pytest.fixture(scope="module")
def https_server(test_ca: TestCA) -> Iterator[LocalServer]:
    with local_server(test_ca.server_context()) as server:
        yield server


def base_policy(**overrides: Any) -> EgressPolicy:
    """web.test, api.test, other.test -> 127.0.0.1 (allow_private on); TOKEN may go to api.test."""
    fields: dict[str, Any] = {
        "allowed_domains": NAMES,
        "host_overrides": {name: "127.0.0.1" for name in NAMES},
        "allow_private": True,
        "secrets": {"TOKEN": Secret(value=SECRET_VALUE, hosts=["api.test"])},  # type: ignore[arg-type]
    }
    fields.update(overrides)
    return EgressPolicy(**fields)


SECRET_VALUE = "real-secret-value-9c1f"


@asynccontextmanager
async def gateway(test_ca: TestCA, tmp_path: Path, policy: EgressPolicy | None = None,
                  **kwargs: Any) -> AsyncIterator[tuple[EgressGateway, Path]]:
    """A started gateway and the guest's trust bundle (test CA as 'the public PKI' + sandbox CA)."""
    gw = EgressGateway(policy or base_policy(), upstream_ca_file=test_ca.ca_file, **kwargs)
    async with gw:
        bundle = tmp_path / "guest-trust.pem"
        bundle.write_bytes(test_ca.ca_file.read_bytes() + (gw.ca_pem or b""))
        yield gw, bundle


async def settled(gw: EgressGateway, entries: int, timeout: float = 15.0) -> None:
    """Wait until the proxy has logged ``entries`` connections and none is active (a client may
    return before the proxy has seen the connection close)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(gw.egress_log()) + gw.proxy.log.dropped < entries or gw.stats.active_connections:
        assert asyncio.get_running_loop().time() < deadline, (
            f"{len(gw.egress_log())} logged, {gw.stats.active_connections} active")
        await asyncio.sleep(0.01)


def proxy_url(gw: EgressGateway) -> str:
    assert gw.proxy_addresses is not None
    host, port = gw.proxy_addresses.forward
    return f"http://{host}:{port}"


async def run_curl(*args: str) -> tuple[int, str, str]:
    """curl with a clean environment (no proxy variables from the host)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
