"""`pip download` from a local package index (HTTPS, the test CA) through the egress proxy."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.egress_support import TestCA, gateway, package_index, proxy_url, settled, test_ca

__all__ = ["test_ca"]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def index_server(test_ca: TestCA, tmp_path: Path) -> Iterator[int]:
    with package_index(test_ca, tmp_path / "index") as port:
        yield port


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
