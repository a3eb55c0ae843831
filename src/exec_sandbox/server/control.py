"""E2B's control plane (its OpenAPI ``/sandboxes`` API), over :class:`SandboxRegistry`.

Every route takes the caller's key from ``X-API-KEY`` (the app checks it and puts its digest in
``request.state.owner``). Bodies are validated with pydantic models written from E2B's published
spec (field names are the wire facts); responses use E2B's JSON field names.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from exec_sandbox.server.errors import BadRequestError, ServeError
from exec_sandbox.server.registry import CLIENT_ID, ENVD_VERSION, SandboxRecord, SandboxRegistry

__all__ = ["ConnectBody", "NewSandboxBody", "TimeoutBody", "control_routes", "detail_json", "listed_json"]

_MAX_LIMIT = 100


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NewSandboxBody(_Body):
    template_id: str = Field(alias="templateID", min_length=1, max_length=200)
    timeout: int | None = Field(default=None, ge=0)
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    auto_pause: bool = Field(default=False, alias="autoPause")
    secure: bool | None = None
    allow_internet_access: bool | None = None


class TimeoutBody(_Body):
    timeout: int = Field(ge=0)


class ConnectBody(_Body):
    timeout: int | None = Field(default=None, ge=0)


class RefreshBody(_Body):
    duration: int | None = Field(default=None, ge=0, le=3600)


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


def created_json(r: SandboxRecord) -> dict[str, Any]:
    return {
        "templateID": r.template_id,
        "sandboxID": r.sandbox_id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": r.envd_access_token,
        # The code-interpreter SDK sends this (not X-Access-Token) on /contexts: the same secret.
        "trafficAccessToken": r.envd_access_token,
        "domain": None,
    }


def listed_json(r: SandboxRecord) -> dict[str, Any]:
    return {
        "templateID": r.template_id,
        "sandboxID": r.sandbox_id,
        "clientID": CLIENT_ID,
        "startedAt": r.iso(r.started_at),
        "endAt": r.iso(r.end_at),
        "cpuCount": 1,
        "memoryMB": r.memory_mb,
        "diskSizeMB": 0,
        "state": r.state if r.state == "running" else "paused",
        "envdVersion": ENVD_VERSION,
        "metadata": r.metadata,
    }


def detail_json(r: SandboxRecord) -> dict[str, Any]:
    return {**listed_json(r), "envdAccessToken": r.envd_access_token, "domain": None}


async def create_sandbox(request: Request) -> Response:
    body: NewSandboxBody = await _body(request, NewSandboxBody)
    if body.auto_pause:
        raise ServeError("autoPause is not implemented by sbx serve", status=400)
    record = await _registry(request).create(
        request.state.owner,
        template_id=body.template_id,
        timeout=body.timeout,
        metadata=body.metadata,
        env_vars=body.env_vars,
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
    if states and "running" not in states.split(","):
        return []
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
    """``connect``: a running sandbox only (pause/resume is not implemented); extends its deadline."""
    body: ConnectBody = await _body(request, ConnectBody)
    registry = _registry(request)
    record = registry.get(request.state.owner, request.path_params["sandbox_id"])
    registry.extend_timeout(record, body.timeout)
    return JSONResponse(created_json(record), status_code=200)


async def not_implemented(request: Request) -> Response:
    _registry(request).get(request.state.owner, request.path_params["sandbox_id"])  # 404 first
    raise ServeError(f"{request.method} {request.url.path} is not implemented by sbx serve", status=501)


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
        Route(sid + "/pause", not_implemented, methods=["POST"]),
        Route(sid + "/resume", not_implemented, methods=["POST"]),
        Route(sid + "/fork", not_implemented, methods=["POST"]),
        Route(sid + "/snapshots", not_implemented, methods=["POST"]),
    ]
