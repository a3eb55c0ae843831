"""E2B's control plane (its OpenAPI ``/sandboxes`` API), over :class:`SandboxRegistry`.

Every route takes the caller's key from ``X-API-KEY`` (the app checks it and puts its digest in
``request.state.owner``). Bodies are validated with pydantic models written from E2B's published
spec (field names are the wire facts); responses use E2B's JSON field names.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from exec_sandbox.server.errors import BadRequestError, ServeError, status_for
from exec_sandbox.server.network import ALL_TRAFFIC, NetworkBody, allowed_domains_for
from exec_sandbox.server.persistence import SavedSandbox
from exec_sandbox.server.registry import CLIENT_ID, ENVD_VERSION, SandboxRecord, SandboxRegistry

__all__ = [
    "ConnectBody",
    "CreatedSandbox",
    "ListedSandbox",
    "NewSandboxBody",
    "SandboxDetail",
    "TimeoutBody",
    "control_routes",
    "detail_json",
    "listed_json",
    "openapi_document",
    "snapshot_json",
]

_MAX_LIMIT = 100


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class AutoResume(_Body):
    enabled: bool = False


class NewSandboxBody(_Body):
    template_id: str = Field(alias="templateID", min_length=1, max_length=200)
    timeout: int | None = Field(default=None, ge=0)
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    auto_pause: bool = Field(default=False, alias="autoPause")
    auto_pause_memory: bool = Field(default=True, alias="autoPauseMemory")
    auto_resume: AutoResume | None = Field(default=None, alias="autoResume")
    secure: bool | None = None
    allow_internet_access: bool | None = None
    network: NetworkBody | None = None  # see exec_sandbox.server.network for the mapping


class TimeoutBody(_Body):
    timeout: int = Field(ge=0)


class ConnectBody(_Body):
    timeout: int | None = Field(default=None, ge=0)


class RefreshBody(_Body):
    duration: int | None = Field(default=None, ge=0, le=3600)


class ForkBody(_Body):
    """E2B's ``SandboxForkRequest``: ``count`` clones (memory + disk) living ``timeout`` seconds."""

    timeout: int | None = Field(default=None, ge=0)
    count: int = Field(default=1, ge=1, le=100)


class SnapshotBody(_Body):
    """E2B's ``SandboxSnapshotRequest``; only memory snapshots (``memory`` true) are made here."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    memory: bool | None = None


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else {}
        return model.model_validate(data)
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(p) for p in first["loc"]) if first else "body"
        why = first["msg"] if first else str(exc)
        raise BadRequestError(f"invalid request body: {where}: {why}") from None


def _registry(request: Request) -> SandboxRegistry:
    registry: SandboxRegistry = request.app.state.registry
    return registry


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True, frozen=True)


class CreatedSandbox(_Out):
    """What create and connect answer (E2B's ``Sandbox``)."""

    template_id: str = Field(alias="templateID")
    sandbox_id: str = Field(alias="sandboxID")
    client_id: str = Field(default=CLIENT_ID, alias="clientID")
    envd_version: str = Field(default=ENVD_VERSION, alias="envdVersion")
    envd_access_token: str = Field(alias="envdAccessToken")
    # The code-interpreter SDK sends this (not X-Access-Token) on /contexts: the same secret.
    traffic_access_token: str = Field(alias="trafficAccessToken")
    domain: str | None = None


class ListedSandbox(_Out):
    """One entry of the lists (E2B's ``ListedSandbox``)."""

    template_id: str = Field(alias="templateID")
    sandbox_id: str = Field(alias="sandboxID")
    client_id: str = Field(default=CLIENT_ID, alias="clientID")
    started_at: str = Field(alias="startedAt")
    end_at: str = Field(alias="endAt")
    cpu_count: int = Field(default=1, alias="cpuCount")
    memory_mb: int = Field(alias="memoryMB")
    disk_size_mb: int = Field(default=0, alias="diskSizeMB")
    state: Literal["running", "paused"] = "running"
    envd_version: str = Field(default=ENVD_VERSION, alias="envdVersion")
    metadata: dict[str, str] = Field(default_factory=dict)


class SandboxDetail(ListedSandbox):
    """``GET /sandboxes/{id}`` (E2B's ``SandboxDetail``)."""

    envd_access_token: str = Field(alias="envdAccessToken")
    domain: str | None = None
    # Never the open internet here; an allowlisted sandbox: allowOut names, everything else denied.
    allow_internet_access: bool = Field(default=False, alias="allowInternetAccess")
    network: dict[str, list[str]] | None = None  # absent, not null, when None (the SDK parses it)


class ErrorBody(_Out):
    """E2B's error body."""

    code: int
    message: str


class ForkResult(_Out):
    """E2B's ``SandboxForkResult``: exactly one of ``sandbox`` and ``error``."""

    sandbox: CreatedSandbox | None = None
    error: ErrorBody | None = None


class SnapshotInfo(_Out):
    """E2B's ``SnapshotInfo``: the id to pass as ``templateID`` to create, and its names."""

    snapshot_id: str = Field(alias="snapshotID")
    names: list[str]


def created_json(r: SandboxRecord) -> dict[str, Any]:
    return CreatedSandbox(
        template_id=r.template_id,
        sandbox_id=r.sandbox_id,
        envd_access_token=r.envd_access_token,
        traffic_access_token=r.envd_access_token,
    ).model_dump(by_alias=True)


def snapshot_json(saved: SavedSandbox) -> dict[str, Any]:
    names = [saved.id] if saved.name is None else [saved.name, saved.id]
    return SnapshotInfo(snapshot_id=saved.id, names=names).model_dump(by_alias=True)


def _listed_fields(r: SandboxRecord) -> dict[str, Any]:
    return {
        "template_id": r.template_id,
        "sandbox_id": r.sandbox_id,
        "started_at": r.iso(r.started_at),
        "end_at": r.iso(r.end_at),
        "memory_mb": r.memory_mb,
        "metadata": r.metadata,
        "state": "paused" if r.state == "paused" else "running",
    }


def listed_json(r: SandboxRecord) -> dict[str, Any]:
    return ListedSandbox(**_listed_fields(r)).model_dump(by_alias=True)


def detail_json(r: SandboxRecord) -> dict[str, Any]:
    net = {"allowOut": list(r.allowed_domains), "denyOut": [ALL_TRAFFIC]} if r.allowed_domains else None
    detail = SandboxDetail(**_listed_fields(r), envd_access_token=r.envd_access_token, network=net)
    return detail.model_dump(by_alias=True, exclude=None if net else {"network"})


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the control plane as served here (a subset of E2B's)."""
    ref = "#/components/schemas/"
    models: dict[str, type[BaseModel]] = {
        "NewSandbox": NewSandboxBody,
        "Sandbox": CreatedSandbox,
        "ListedSandbox": ListedSandbox,
        "SandboxDetail": SandboxDetail,
        "TimeoutRequest": TimeoutBody,
        "ConnectSandbox": ConnectBody,
        "RefreshRequest": RefreshBody,
        "SandboxForkRequest": ForkBody,
        "SandboxForkResult": ForkResult,
        "CreatedSandbox": CreatedSandbox,  # referred to from SandboxForkResult
        "AutoResume": AutoResume,  # ... from NewSandbox
        "NetworkBody": NetworkBody,  # ... from NewSandbox (E2B's SandboxNetworkConfig)
        "ErrorBody": ErrorBody,
        "SandboxSnapshotRequest": SnapshotBody,
        "SnapshotInfo": SnapshotInfo,
        "Error": ErrorBody,
    }
    schemas = {
        name: m.model_json_schema(by_alias=True, ref_template=ref + "{model}") for name, m in models.items()
    }

    def body(name: str) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": {"$ref": ref + name}}}}

    def answer(code: str, name: str | None, *, array: bool = False) -> dict[str, Any]:
        if name is None:
            return {code: {"description": "done"}}
        schema: dict[str, Any] = {"$ref": ref + name}
        if array:
            schema = {"type": "array", "items": schema}
        return {code: {"description": name, "content": {"application/json": {"schema": schema}}}}

    errors = {
        **answer("400", "Error"),
        **answer("401", "Error"),
        **answer("404", "Error"),
        **answer("429", "Error"),
    }
    sid = [{"name": "sandboxID", "in": "path", "required": True, "schema": {"type": "string"}}]
    create = {"requestBody": body("NewSandbox"), "responses": {**answer("201", "Sandbox"), **errors}}
    connect = {
        "parameters": sid,
        "requestBody": body("ConnectSandbox"),
        "responses": {**answer("200", "Sandbox"), **errors},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sbx serve: E2B-compatible control plane", "version": ENVD_VERSION},
        "security": [{"ApiKeyAuth": []}],
        "paths": {
            "/sandboxes": {
                "post": create,
                "get": {"responses": {**answer("200", "ListedSandbox", array=True), **errors}},
            },
            "/v2/sandboxes": {
                "post": create,
                "get": {
                    "parameters": [
                        {"name": n, "in": "query", "schema": {"type": t}}
                        for n, t in (
                            ("limit", "integer"),
                            ("nextToken", "string"),
                            ("metadata", "string"),
                            ("state", "string"),
                        )
                    ],
                    "responses": {**answer("200", "ListedSandbox", array=True), **errors},
                },
            },
            "/sandboxes/{sandboxID}": {
                "get": {"parameters": sid, "responses": {**answer("200", "SandboxDetail"), **errors}},
                "delete": {"parameters": sid, "responses": {**answer("204", None), **errors}},
            },
            "/sandboxes/{sandboxID}/timeout": {
                "post": {
                    "parameters": sid,
                    "requestBody": body("TimeoutRequest"),
                    "responses": {**answer("204", None), **errors},
                }
            },
            "/sandboxes/{sandboxID}/refreshes": {
                "post": {
                    "parameters": sid,
                    "requestBody": body("RefreshRequest"),
                    "responses": {**answer("204", None), **errors},
                }
            },
            "/sandboxes/{sandboxID}/connect": {"post": connect},
            "/sandboxes/{sandboxID}/pause": {
                "post": {
                    "parameters": sid,
                    "responses": {**answer("204", None), **answer("409", "Error"), **errors},
                }
            },
            "/sandboxes/{sandboxID}/resume": {
                "post": {
                    "parameters": sid,
                    "requestBody": body("ConnectSandbox"),
                    "responses": {**answer("201", "Sandbox"), **answer("409", "Error"), **errors},
                }
            },
            "/v2/sandboxes/{sandboxID}/connect": {"post": connect},
            "/sandboxes/{sandboxID}/fork": {
                "post": {
                    "summary": "Clone a running sandbox (memory + disk) into count new ones of the same key",
                    "parameters": sid,
                    "requestBody": body("SandboxForkRequest"),
                    "responses": {
                        **answer("201", "SandboxForkResult", array=True), **answer("409", "Error"), **errors
                    },
                }
            },
            "/sandboxes/{sandboxID}/snapshots": {
                "post": {
                    "summary": "Save a running sandbox (memory + disk) as a template: create restores it",
                    "parameters": sid,
                    "requestBody": body("SandboxSnapshotRequest"),
                    "responses": {**answer("201", "SnapshotInfo"), **answer("409", "Error"), **errors},
                }
            },
            "/snapshots": {
                "get": {
                    "parameters": [
                        {"name": n, "in": "query", "schema": {"type": "string"}}
                        for n in ("sandboxID", "name")
                    ],
                    "responses": {**answer("200", "SnapshotInfo", array=True), **errors},
                }
            },
            "/templates/{templateID}": {
                "delete": {
                    "parameters": [
                        {"name": "templateID", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {**answer("204", None), **answer("409", "Error"), **errors},
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-KEY"}},
        },
    }


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def create_sandbox(request: Request) -> Response:
    body: NewSandboxBody = await _body(request, NewSandboxBody)
    if body.auto_pause and not body.auto_pause_memory:
        raise BadRequestError("filesystem-only auto-pause (autoPauseMemory: false) is not supported here")
    if body.auto_resume is not None and body.auto_resume.enabled:
        raise BadRequestError("autoResume is not supported by sbx serve: connect resumes a paused sandbox")
    domains = allowed_domains_for(body.allow_internet_access, body.network)
    if domains and body.auto_pause:
        raise BadRequestError("autoPause: a sandbox with network egress cannot be paused by sbx serve")
    record = await _registry(request).create(
        request.state.owner,
        template_id=body.template_id,
        timeout=body.timeout,
        metadata=body.metadata,
        env_vars=body.env_vars,
        auto_pause=body.auto_pause,
        allowed_domains=domains,
    )
    return JSONResponse(created_json(record), status_code=201)


async def get_sandbox(request: Request) -> Response:
    record = _registry(request).get(request.state.owner, request.path_params["sandbox_id"])
    return JSONResponse(detail_json(record))


def _metadata_filter(request: Request) -> list[tuple[str, str]]:
    raw = request.query_params.get("metadata")
    return parse_qsl(raw, keep_blank_values=True) if raw else []


def _matching(request: Request) -> list[SandboxRecord]:
    wanted = _metadata_filter(request)
    states = request.query_params.get("state")
    records = _registry(request).records(request.state.owner)
    if states:
        allowed = set(states.split(","))
        records = [r for r in records if r.state in allowed]
    return [r for r in records if all(r.metadata.get(k) == v for k, v in wanted)]


async def list_sandboxes(request: Request) -> Response:
    return JSONResponse([listed_json(r) for r in _matching(request)])


async def list_sandboxes_v2(request: Request) -> Response:
    """``GET /v2/sandboxes``: pages of ``limit``; the next page's token is in ``x-next-token``."""
    try:
        limit = int(request.query_params.get("limit", _MAX_LIMIT))
    except ValueError:
        raise BadRequestError("limit must be an integer") from None
    if not 1 <= limit <= _MAX_LIMIT:
        raise BadRequestError(f"limit must be between 1 and {_MAX_LIMIT}")
    records = _matching(request)
    if request.query_params.get("order", "desc") == "desc":
        records.reverse()
    start = 0
    token = request.query_params.get("nextToken")
    if token:
        try:
            start = int(base64.urlsafe_b64decode(token.encode()).decode())
        except ValueError:
            raise BadRequestError("invalid nextToken") from None
    page = records[start : start + limit]
    headers = {}
    if start + limit < len(records):
        headers["x-next-token"] = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
    return JSONResponse([listed_json(r) for r in page], headers=headers)


async def kill_sandbox(request: Request) -> Response:
    await _registry(request).kill(request.state.owner, request.path_params["sandbox_id"])
    return Response(status_code=204)


async def set_timeout(request: Request) -> Response:
    body: TimeoutBody = await _body(request, TimeoutBody)
    registry = _registry(request)
    record = registry.get(request.state.owner, request.path_params["sandbox_id"])
    registry.set_timeout(record, body.timeout)
    return Response(status_code=204)


async def refresh(request: Request) -> Response:
    body: RefreshBody = await _body(request, RefreshBody)
    registry = _registry(request)
    record = registry.get(request.state.owner, request.path_params["sandbox_id"])
    registry.extend_timeout(record, body.duration if body.duration is not None else 60)
    return Response(status_code=204)


async def connect_sandbox(request: Request) -> Response:
    """``connect``: resumes a paused sandbox (201) or extends a running one's deadline (200)."""
    body: ConnectBody = await _body(request, ConnectBody)
    registry = _registry(request)
    record = registry.get(request.state.owner, request.path_params["sandbox_id"])
    if record.state == "paused":
        await registry.resume(record, body.timeout)
        return JSONResponse(created_json(record), status_code=201)
    registry.extend_timeout(record, body.timeout)
    return JSONResponse(created_json(record), status_code=200)


async def pause_sandbox(request: Request) -> Response:
    registry = _registry(request)
    await registry.pause(registry.get(request.state.owner, request.path_params["sandbox_id"]))
    return Response(status_code=204)


async def resume_sandbox(request: Request) -> Response:
    """The older ``/resume``: 409 unless the sandbox is paused."""
    body: ConnectBody = await _body(request, ConnectBody)
    registry = _registry(request)
    record = registry.get(request.state.owner, request.path_params["sandbox_id"])
    if record.state != "paused":
        raise ServeError(f"sandbox {record.sandbox_id!r} is not paused", status=409)
    await registry.resume(record, body.timeout)
    return JSONResponse(created_json(record), status_code=201)


async def fork_sandbox(request: Request) -> Response:
    """One result per requested fork: a new sandbox, or the error that fork met (E2B's shape)."""
    body: ForkBody = await _body(request, ForkBody)
    registry = _registry(request)
    record = registry.get(request.state.owner, request.path_params["sandbox_id"])
    results = []
    for made in await registry.fork(record, body.count, body.timeout):
        if isinstance(made, SandboxRecord):
            results.append({"sandbox": created_json(made)})
        else:
            status = status_for(made)
            results.append({"error": {"code": status, "message": made.message}})
    return JSONResponse(results, status_code=201)


async def snapshot_sandbox(request: Request) -> Response:
    body: SnapshotBody = await _body(request, SnapshotBody)
    if body.memory is False:
        raise BadRequestError("filesystem-only snapshots (memory: false) are not supported by sbx serve")
    registry = _registry(request)
    record = registry.get(request.state.owner, request.path_params["sandbox_id"])
    saved = await registry.snapshot_template(record, body.name)
    return JSONResponse(snapshot_json(saved), status_code=201)


async def list_snapshots(request: Request) -> Response:
    """The caller's snapshot templates (``sandboxID`` / ``name`` filters), oldest first."""
    found = _registry(request).templates(request.state.owner)
    source = request.query_params.get("sandboxID")
    if source:
        found = [t for t in found if t.source == source]
    name = request.query_params.get("name")
    if name:
        found = [t for t in found if name in (t.name, t.id)]
    return JSONResponse([snapshot_json(t) for t in found])


async def delete_template(request: Request) -> Response:
    await _registry(request).delete_template(request.state.owner, request.path_params["template_id"])
    return Response(status_code=204)


def control_routes() -> list[Route]:
    sid = "/sandboxes/{sandbox_id}"
    return [
        Route("/sandboxes", create_sandbox, methods=["POST"]),
        Route("/v2/sandboxes", create_sandbox, methods=["POST"]),
        Route("/sandboxes", list_sandboxes, methods=["GET"]),
        Route("/v2/sandboxes", list_sandboxes_v2, methods=["GET"]),
        Route(sid, get_sandbox, methods=["GET"]),
        Route(sid, kill_sandbox, methods=["DELETE"]),
        Route(sid + "/timeout", set_timeout, methods=["POST"]),
        Route(sid + "/refreshes", refresh, methods=["POST"]),
        Route(sid + "/connect", connect_sandbox, methods=["POST"]),
        Route("/v2" + sid + "/connect", connect_sandbox, methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route(sid + "/pause", pause_sandbox, methods=["POST"]),
        Route(sid + "/resume", resume_sandbox, methods=["POST"]),
        Route(sid + "/fork", fork_sandbox, methods=["POST"]),
        Route(sid + "/snapshots", snapshot_sandbox, methods=["POST"]),
        Route("/snapshots", list_snapshots, methods=["GET"]),
        Route("/templates/{template_id}", delete_template, methods=["DELETE"]),
    ]
