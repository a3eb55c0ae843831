"""Our extras in ``/openapi.json`` (fork, snapshots): the paths are there, and what the handlers answer
validates against the schemas the E2B SDK parses (field names are the wire facts)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError

from exec_sandbox.server.control import openapi_document, snapshot_json
from exec_sandbox.server.persistence import SavedSandbox


def _check(doc: dict[str, Any], name: str, instance: object) -> None:
    Draft202012Validator({**doc, "$ref": f"#/components/schemas/{name}"}).validate(instance)


def test_fork_and_snapshot_wire_shapes() -> None:
    doc = openapi_document()
    paths = doc["paths"]
    assert "201" in paths["/sandboxes/{sandboxID}/fork"]["post"]["responses"]
    assert "201" in paths["/sandboxes/{sandboxID}/snapshots"]["post"]["responses"]
    assert "get" in paths["/snapshots"] and "delete" in paths["/templates/{templateID}"]
    _check(doc, "SandboxForkRequest", {"count": 2, "timeout": 30})
    with pytest.raises(ValidationError):
        _check(doc, "SandboxForkRequest", {"count": 0})
    sandbox = {
        "templateID": "base", "sandboxID": "i1", "clientID": "sbx-serve", "envdVersion": "0.5.7",
        "envdAccessToken": "t", "trafficAccessToken": "t",
    }
    _check(doc, "SandboxForkResult", {"sandbox": sandbox})
    _check(doc, "SandboxForkResult", {"error": {"code": 429, "message": "quota exceeded"}})
    now = time.time()
    saved = SavedSandbox(
        id="snap-0123abcd", name="pi", owner="cd" * 32, template_id="base", memory_mb=256,
        started_at=now, end_at=now, saved_at=now,
    )
    info = snapshot_json(saved)
    assert info == {"snapshotID": "snap-0123abcd", "names": ["pi", "snap-0123abcd"]}
    _check(doc, "SnapshotInfo", info)
    _check(doc, "SandboxSnapshotRequest", {"name": "pi", "memory": True})
