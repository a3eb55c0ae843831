"""``sbx serve --log-format json|text``: every line a JSON object (uvicorn's too), one access line per
request with its id, method, path, status, duration, sandbox and owner tag - never the API key or
a sandbox's access token."""

from __future__ import annotations

import hashlib
import json
import signal
from typing import Any

import httpx
import pytest

from tests.integration.test_serve_cli import serve_up

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

KEY = "log-test-key-0123456789"


def _stop(proc: Any) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    text: str = out.decode()
    return text


def test_json_logs_one_object_per_line_with_request_fields() -> None:
    proc, url = serve_up(KEY, "--log-format", "json")
    try:
        auth = {"X-API-KEY": KEY}
        created = httpx.post(url + "/sandboxes", headers=auth, json={"templateID": "base"}, timeout=120)
        assert created.status_code == 201
        sid, token = created.json()["sandboxID"], created.json()["envdAccessToken"]
        got = httpx.get(f"{url}/sandboxes/{sid}", headers={**auth, "X-Request-Id": "my-req.1"})
        assert got.headers["x-request-id"] == "my-req.1"
        health = httpx.get(url + "/health", headers={"E2b-Sandbox-Id": sid, "X-Access-Token": token})
        assert health.status_code in (200, 204)
        refused = httpx.get(url + "/v2/sandboxes", headers={"X-API-KEY": "wrong", "X-Request-Id": "bad id!"})
        assert refused.status_code == 401
        assert refused.headers["x-request-id"] != "bad id!"  # not a token: a fresh id instead
        assert httpx.delete(f"{url}/sandboxes/{sid}", headers=auth).status_code == 204
    finally:
        out = _stop(proc)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]  # every line is JSON
    assert all({"time", "level", "logger", "event"} <= set(line) for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines), "uvicorn's lines go through it"
    requests = [line for line in lines if line["event"] == "request"]
    owner = hashlib.sha256(KEY.encode()).hexdigest()[:12]

    def one(method: str, path: str) -> dict[str, Any]:
        found = [r for r in requests if r["method"] == method and r["path"] == path]
        assert len(found) == 1, (method, path, requests)
        return found[0]

    create = one("POST", "/sandboxes")
    assert create["status"] == 201 and create["owner"] == owner and create["duration_ms"] > 0
    assert create["request_id"]
    get = one("GET", f"/sandboxes/{sid}")
    assert [get[k] for k in ("request_id", "sandbox_id", "owner", "status")] == ["my-req.1", sid, owner, 200]
    envd = one("GET", "/health")
    assert envd["sandbox_id"] == sid and envd["owner"] == owner
    bad = one("GET", "/v2/sandboxes")
    assert bad["status"] == 401 and "owner" not in bad
    assert one("DELETE", f"/sandboxes/{sid}")["status"] == 204
    # the sandbox's own lines carry its id and owner, and the request that made it
    made = [line for line in lines if line["event"].startswith(f"sandbox {sid} created")]
    assert made and made[0]["owner"] == owner and made[0]["request_id"] == create["request_id"]
    assert KEY not in out and token not in out and "wrong" not in out


def test_text_logs_for_people() -> None:
    proc, url = serve_up(KEY, "--log-format", "text")
    try:
        r = httpx.get(url + "/v2/sandboxes", headers={"X-API-KEY": KEY, "X-Request-Id": "txt-1"})
        assert r.status_code == 200
    finally:
        out = _stop(proc)
    line = next(line for line in out.splitlines() if "GET /v2/sandboxes 200" in line)
    assert "request_id=txt-1" in line and "owner=" in line
    with pytest.raises(ValueError):
        json.loads(line)
    assert KEY not in out
