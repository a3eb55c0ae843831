"""``sbx serve`` and its MCP tools with the network allowlist and packages, over real HTTP with the
unmodified ``e2b`` SDK and the ``mcp`` client, against real microVMs (QEMU under TCG).

Every server is the test's own on 127.0.0.1: an HTTP server the sandbox may reach by an allowlisted
name (mapped there by the server's ``host_overrides``, ``egress_allow_private`` on), and a PEP 503
index for ``packages=``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from e2b import ALL_TRAFFIC, Sandbox, SandboxException
from e2b_code_interpreter import Sandbox as CodeSandbox
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.integration.egress_support import LocalServer, local_server
from tests.integration.package_index import LocalIndex, package_scheduler, serve_index
from tests.integration.serve_server import KEY_A, RunningServer, running_server, sdk_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

_FETCH = """python3 - <<'PY'
import urllib.request
for host in ("web.test", "other.test"):
    try:
        body = urllib.request.urlopen(f"http://{host}:%d/say/from-" + host, timeout=20).read().decode()
        print(host, "ok", body)
    except Exception as exc:
        print(host, "refused", type(exc).__name__)
PY"""


@pytest.fixture(scope="module")
def web() -> Iterator[LocalServer]:
    with local_server() as server:
        yield server


@pytest.fixture(scope="module")
def net_server() -> Iterator[RunningServer]:
    overrides = {"web.test": "127.0.0.1", "other.test": "127.0.0.1"}  # both reachable, if allowed
    with running_server(host_overrides=overrides, egress_allow_private=True) as srv, sdk_env(srv.url, KEY_A):
        yield srv


def test_an_allowlisted_sandbox_reaches_its_name_and_nothing_else(
    net_server: RunningServer, web: LocalServer
) -> None:
    sbx = Sandbox.create(network={"allow_out": ["web.test"], "deny_out": [ALL_TRAFFIC]}, timeout=300)
    try:
        out = sbx.commands.run(_FETCH % web.port, timeout=120)
        lines = out.stdout.splitlines()
        assert lines[0] == "web.test ok from-web.test", out
        assert lines[1].startswith("other.test refused"), out
        paths = [path for path, _ in web.seen]
        assert "/say/from-web.test" in paths and "/say/from-other.test" not in paths
        info = sbx.get_info()
        assert info.allow_internet_access is False
        assert info.network is not None and info.network["allow_out"] == ["web.test"]
        # A networked sandbox is not saved: its egress gateway would not come back with it.
        with pytest.raises(SandboxException, match="network egress"):
            sbx.pause()
        assert sbx.commands.run("echo still-here").stdout == "still-here\n"
    finally:
        sbx.kill()


def test_code_interpreter_contexts_get_the_sandboxs_allowlist(
    net_server: RunningServer, web: LocalServer
) -> None:
    sbx = CodeSandbox.create(network={"allow_out": ["web.test"]}, timeout=300)
    try:
        fetch = (
            "import urllib.request\n"
            "urllib.request.urlopen('http://{}:%d/say/ctx-{}', timeout=20).read().decode()"
        )
        ok = sbx.run_code(fetch.format("web.test", "web") % web.port)
        assert ok.error is None and ok.text == "'ctx-web'", ok
        refused = sbx.run_code(fetch.format("other.test", "other") % web.port)
        # the sandbox's egress proxy answers 403 for a name off the list
        assert refused.error is not None and "403" in refused.error.value, refused
        assert "/say/ctx-other" not in [path for path, _ in web.seen]
    finally:
        sbx.kill()


def test_a_sandbox_without_a_list_has_no_network(net_server: RunningServer, web: LocalServer) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        out = sbx.commands.run(_FETCH % web.port, timeout=120)
        assert [line.split()[1] for line in out.stdout.splitlines()] == ["refused", "refused"], out
    finally:
        sbx.kill()


def test_internet_without_a_list_is_refused_before_any_vm(net_server: RunningServer) -> None:
    for kwargs in ({"allow_internet_access": True}, {"network": {"deny_out": ["10.0.0.0/8"]}}):
        with pytest.raises(SandboxException, match=r"400: .*only allowlisted egress"):
            Sandbox.create(**kwargs)  # type: ignore[arg-type]
    r = httpx.post(
        net_server.url + "/sandboxes", headers={"X-API-KEY": KEY_A},
        json={"templateID": "base", "allow_internet_access": True},
    )
    assert r.status_code == 400
    assert r.json() == {"code": 400, "message": r.json()["message"]}
    assert "network.allowOut" in r.json()["message"]
    assert Sandbox.list().next_items() == []  # no VM was made for any of them


def _payload(result: Any) -> dict[str, Any]:
    assert not result.is_error, result
    data: dict[str, Any] = result.structured_content or json.loads(
        "".join(c.text for c in result.content if getattr(c, "type", "") == "text")
    )
    return data.get("result", data) if set(data) == {"result"} else data


def test_mcp_run_code_with_packages_returns_the_lock(tmp_path: Path) -> None:
    (tmp_path / "index").mkdir()
    with serve_index(LocalIndex(tmp_path / "index")) as index, pytest.MonkeyPatch.context() as mp:
        index.add_wheel("sbxdep", "0.3")
        index.add_wheel("sbxdemo", "2.0", requires=("sbxdep>=0.2",))
        for key, value in index.env().items():
            mp.setenv(key, value)
        caches = tmp_path / "caches"
        with running_server(scheduler_factory=lambda: package_scheduler(caches)) as srv:
            asyncio.run(_mcp_packages(srv, index))


async def _mcp_packages(server: RunningServer, index: LocalIndex) -> None:
    code = "import sbxdemo, sbxdep; print(sbxdemo.__version__, sbxdep.__version__)"
    http = httpx2.AsyncClient(headers={"X-API-KEY": KEY_A}, timeout=300)
    async with Client(streamable_http_client(server.url + "/mcp", http_client=http)) as client:
        out = _payload(await client.call_tool("run_code", {"code": code, "packages": ["sbxdemo"]}))
        assert (out["exit_code"], out["stdout"]) == (0, "2.0 0.3\n"), out
        lock = out["packages"]
        assert lock["ecosystem"] == "pip"
        assert {p["name"]: p["version"] for p in lock["packages"]} == {"sbxdemo": "2.0", "sbxdep": "0.3"}
        # The lock handed back reinstalls exactly that, without asking the index.
        index.hits.clear()
        again = _payload(await client.call_tool("run_code", {"code": code, "packages": lock}))
        assert again["stdout"] == "2.0 0.3\n" and again["packages"] == lock and index.hits == []
        plain = _payload(await client.call_tool("run_code", {"code": "print(1)"}))
        assert plain["packages"] is None
        opened = _payload(await client.call_tool("session_open", {"packages": ["sbxdemo==2.0"]}))
        installed = {p["name"]: p["version"] for p in opened["packages"]["packages"]}
        assert installed == {"sbxdemo": "2.0", "sbxdep": "0.3"}
        ran = await client.call_tool("session_exec", {"session_id": opened["session_id"], "code": code})
        assert _payload(ran)["stdout"] == "2.0 0.3\n"
        await client.call_tool("session_close", {"session_id": opened["session_id"]})
        for args, field in (
            ({"code": "1", "packages": ["not a requirement!!"]}, "packages"),
            ({"code": "1", "packages": {"ecosystem": "pip"}}, "packages"),
            ({"code": "1", "allowed_domains": ["bad name!"]}, "allowed_domains"),
        ):
            bad = await client.call_tool("run_code", args)
            assert bad.is_error and field in str(bad.content), bad
    await http.aclose()
