"""`pip download` from a local package index (HTTPS, the test CA) through the egress proxy."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import os
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.egress_support import TestCA, gateway, proxy_url, settled, test_ca

__all__ = ["test_ca"]

pytestmark = pytest.mark.timeout(120)


def _wheel(directory: Path) -> Path:
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


@pytest.fixture
def index_server(test_ca: TestCA, tmp_path: Path) -> Iterator[int]:
    root = tmp_path / "index"
    (root / "simple" / "egress-demo").mkdir(parents=True)
    (root / "files").mkdir()
    wheel = _wheel(root / "files")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / "egress-demo" / "index.html").write_text(
        f'<html><body><a href="/files/{wheel.name}#sha256={sha}">{wheel.name}</a></body></html>\n')
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.socket = test_ca.server_context().wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()


async def test_pip_download_through_the_proxy(test_ca: TestCA, tmp_path: Path, index_server: int) -> None:
    async with gateway(test_ca, tmp_path) as (gw, bundle):
        out = tmp_path / "dl"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
               "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(out), "--proxy", proxy_url(gw),
            "--cert", str(bundle), "--index-url", f"https://other.test:{index_server}/simple/",
            "--retries", "0", "--timeout", "10", "egress-demo",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, (stdout + stderr).decode()
        assert (out / "egress_demo-1.0-py3-none-any.whl").exists()
        # an index outside the allowlist: refused by the proxy (pip reports no versions found)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(out), "--proxy", proxy_url(gw),
            "--cert", str(bundle), "--index-url", f"https://evil.test:{index_server}/simple/",
            "--retries", "0", "--timeout", "10", "egress-demo",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        stdout, stderr = await proc.communicate()
        assert proc.returncode != 0, (stdout + stderr).decode()
        await settled(gw, 3)
        assert {(e.name, e.allowed, e.rule) for e in gw.egress_log()} == {
            ("other.test", True, None), ("evil.test", False, "not_allowlisted")}
