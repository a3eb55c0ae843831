"""The MCP server of ``sbx serve`` at ``/mcp`` (streamable HTTP), driven by the official ``mcp`` client,
plus ``/healthz`` and ``/metrics``; real microVMs under TCG."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.integration.serve_server import KEY_A, KEY_B, RunningServer, running_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server() as srv:
        yield srv


def _payload(result: Any) -> dict[str, Any]:
    assert not result.is_error, result
    if result.structured_content is not None:
        data: dict[str, Any] = result.structured_content
        return data.get("result", data) if set(data) == {"result"} else data
    text = "".join(c.text for c in result.content if getattr(c, "type", "") == "text")
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def test_mcp_tools_run_code_and_sessions(server: RunningServer) -> None:
    async def scenario() -> None:
        http = httpx2.AsyncClient(headers={"X-API-KEY": KEY_A}, timeout=120)
        async with Client(streamable_http_client(server.url + "/mcp", http_client=http)) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"run_code", "session_open", "session_exec", "session_fork", "session_close"} <= names
            out = _payload(await client.call_tool("run_code", {"code": "print(6 * 7)"}))
            assert out["stdout"] == "42\n" and out["exit_code"] == 0
            opened = _payload(await client.call_tool("session_open", {"language": "python"}))
            sid = opened["session_id"]
            await client.call_tool("session_exec", {"session_id": sid, "code": "n = 5"})
            await client.call_tool("write_file", {"session_id": sid, "path": "f.txt", "content": "hey"})
            forked = _payload(await client.call_tool("session_fork", {"session_id": sid}))
            child = forked["session_id"]
            args = {"session_id": child, "code": "print(n)"}
            again = _payload(await client.call_tool("session_exec", args))
            assert again["stdout"] == "5\n"
            await _other_key_cannot_use(server, sid)
            read = _payload(await client.call_tool("read_file", {"session_id": sid, "path": "f.txt"}))
            assert read["content"] == "hey"
            listed = _payload(await client.call_tool("list_files", {"session_id": sid}))
            assert [e["name"] for e in listed["entries"]] == ["f.txt"]
            for s in (sid, forked["session_id"]):
                assert _payload(await client.call_tool("session_close", {"session_id": s}))["closed"] is True
        await http.aclose()

    asyncio.run(scenario())


async def _other_key_cannot_use(server: RunningServer, sid: str) -> None:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY_B}"}, timeout=60)
    async with Client(streamable_http_client(server.url + "/mcp", http_client=http)) as other:
        result = await other.call_tool("session_exec", {"session_id": sid, "code": "print(n)"})
        assert result.is_error and "no open session" in str(result.content)
        closed = _payload(await other.call_tool("session_close", {"session_id": sid}))
        assert closed["closed"] is False
    await http.aclose()


def test_mcp_needs_a_key_and_health_metrics_do_not(server: RunningServer) -> None:
    r = httpx.post(server.url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert r.status_code == 401 and r.json()["code"] == 401
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    metrics = httpx.get(server.url + "/metrics").text
    names = ("sbx_serve_sandboxes", "sbx_serve_request_seconds", "sbx_serve_run_seconds")
    for name in (*names, "sbx_serve_sandboxes_created_total"):
        assert name in metrics
    doc = httpx.get(server.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v2/sandboxes" in doc["paths"]
