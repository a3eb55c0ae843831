"""The ASGI app of ``sbx serve``: one process serves E2B's control plane, every sandbox's envd API
and its code interpreter, routed like E2B's edge proxy does it.

Routing (:class:`ServeApp`)::

    request with E2b-Sandbox-Id header        -> that sandbox (checked against X-Access-Token;
                                                 a gone sandbox is 502, like E2B's proxy)
        E2b-Sandbox-Port 49999                -> code interpreter  (/execute, /contexts)
        path /process.Process/*               -> envd Process      (Connect RPC)
        path /filesystem.Filesystem/*         -> envd Filesystem   (Connect RPC)
        else                                  -> envd HTTP         (/files, /health)
    /mcp                                      -> MCP server (streamable HTTP; X-API-KEY or Bearer)
    anything else                             -> control plane     (/sandboxes..., X-API-KEY)
                                                 and /healthz, /metrics, /openapi.json (no key)

Refusals use E2B's error body ``{"code": <status>, "message": ...}`` (Connect RPC paths: Connect's
``{"code": "unauthenticated" | "not_found", "message": ...}``); never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Final

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from exec_sandbox.errors import SandboxError
from exec_sandbox.server import metrics
from exec_sandbox.server.config import ServeConfig
from exec_sandbox.server.control import control_routes
from exec_sandbox.server.envd import CURRENT_SANDBOX, connect_apps
from exec_sandbox.server.errors import NotFoundError, ServeError, status_for
from exec_sandbox.server.files import envd_routes
from exec_sandbox.server.interpreter import interpreter_routes
from exec_sandbox.server.logs import RequestLog
from exec_sandbox.server.mcp import McpSandboxTools, build_mcp_server
from exec_sandbox.server.registry import SandboxRegistry

__all__ = ["JUPYTER_PORT", "ServeApp", "create_app"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

JUPYTER_PORT: Final = 49999
_CONNECT_CODES: Final = {
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    502: "unavailable",
    503: "unavailable",
}


async def _sandbox_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SandboxError)
    status = status_for(exc)
    if status >= 500:
        logger.warning("%s %s failed: %r", request.method, request.url.path, exc)
    return JSONResponse({"code": status, "message": exc.message}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"code": exc.status_code, "message": exc.detail}, status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"code": 500, "message": "internal server error"}, status_code=500)


def _starlette(routes: list[Route], **kwargs: Any) -> Starlette:
    handlers: dict[Any, Any] = {
        SandboxError: _sandbox_error,
        HTTPException: _http_error,
        Exception: _internal_error,
    }
    return Starlette(routes=routes, exception_handlers=handlers, **kwargs)


class ServeApp:
    """The whole service as one ASGI callable (see the module docstring for the routing)."""

    def __init__(self, config: ServeConfig, scheduler_factory: Callable[[], Any] | None = None) -> None:
        self.config = config
        self._scheduler_factory = scheduler_factory
        self.registry: SandboxRegistry | None = None
        self.control = _starlette(
            [
                *control_routes(),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )
        self.envd = _starlette(envd_routes())
        self.interpreter = _starlette(interpreter_routes())
        self.connect = connect_apps()
        self.mcp_tools = McpSandboxTools(max_sessions=config.max_sandboxes_per_key)
        self.mcp_app = build_mcp_server(self.mcp_tools).streamable_http_app(
            streamable_http_path="/mcp", host=config.host
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self._scheduler_factory is not None:
            scheduler = self._scheduler_factory()
        else:
            from exec_sandbox.sandbox.scheduler import Scheduler

            scheduler = Scheduler(self.config.scheduler_config())
        await scheduler.start()
        registry = SandboxRegistry(scheduler, self.config)
        try:
            registry.start()  # opens the state dir: refused if another server holds it
        except BaseException:
            await scheduler.close()
            raise
        self.registry = registry
        for sub in (self.control, self.envd, self.interpreter):
            sub.state.registry = registry
        metrics.bind(registry)
        self.mcp_tools.scheduler = scheduler
        logger.info(
            "sbx serve ready on %s:%s (%d API keys)",
            self.config.host,
            self.config.port,
            len(self.config.api_key_hashes),
        )
        try:
            async with self.mcp_app.router.lifespan_context(self.mcp_app):
                yield
        finally:
            await self.mcp_tools.aclose()
            await registry.aclose()
            await scheduler.close()

    async def _healthz(self, request: Request) -> Response:
        ok = self.registry is not None
        return JSONResponse({"status": "ok" if ok else "starting"}, status_code=200 if ok else 503)

    async def _metrics(self, request: Request) -> Response:
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.control(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        sandbox_id = headers.get("e2b-sandbox-id")
        started = time.perf_counter()
        log = RequestLog(scope["method"], scope["path"], sandbox_id, headers.get("x-request-id"))
        scope.setdefault("state", {})["log"] = log
        token = log.enter()

        async def send_logged(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                log.status = message["status"]
                extra = [(b"x-request-id", log.request_id.encode())]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            if sandbox_id is None:
                await self._control(scope, receive, send_logged, headers)
            else:
                await self._sandbox(scope, receive, send_logged, headers, sandbox_id)
        finally:
            metrics.observe_request(scope, started)
            log.finish()
            RequestLog.leave(token)

    async def _control(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        path: str = scope["path"]
        if path in ("/healthz", "/metrics", "/openapi.json"):
            await self.control(scope, receive, send)
            return
        key = headers.get("x-api-key")
        is_mcp = path == "/mcp" or path.startswith("/mcp/")
        if key is None and is_mcp and headers.get("authorization", "").lower().startswith("bearer "):
            key = headers["authorization"][7:].strip()
        owner = self.config.key_hash_for(key)
        if owner is None:
            await _error(send, 401, "missing or invalid API key (X-API-KEY)")
            return
        scope["state"]["owner"] = owner
        scope["state"]["log"].set_owner(owner)
        await (self.mcp_app if is_mcp else self.control)(scope, receive, send)

    async def _sandbox(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], sandbox_id: str
    ) -> None:
        path: str = scope["path"]
        connect = next((app for prefix, app in self.connect.items() if path.startswith(prefix)), None)
        if self.registry is None:
            await _error(send, 503, "the server is starting", connect=connect is not None)
            return
        token = headers.get("x-access-token") or headers.get("e2b-traffic-access-token")
        try:
            record = self.registry.for_token(sandbox_id, token)
        except NotFoundError:
            # What E2B's edge proxy answers for a sandbox that is gone (the SDKs read it so).
            msg = f"sandbox {sandbox_id!r} not found: it was killed or timed out"
            await _error(send, 502, msg, connect=connect is not None)
            return
        except ServeError as exc:
            await _error(send, exc.status, exc.message, connect=connect is not None)
            return
        scope["state"]["log"].set_owner(record.owner)
        CURRENT_SANDBOX.set(record)
        if headers.get("e2b-sandbox-port") == str(JUPYTER_PORT):
            await self.interpreter(scope, receive, send)
        elif connect is not None:
            await connect(scope, receive, send)
        else:
            await self.envd(scope, receive, send)


async def _error(send: Send, status: int, message: str, *, connect: bool = False) -> None:
    code: Any = _CONNECT_CODES.get(status, "unknown") if connect else status
    body = json.dumps({"code": code, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(config: ServeConfig, scheduler_factory: Callable[[], Any] | None = None) -> ServeApp:
    """The ASGI app for ``config`` (its lifespan starts a Scheduler, or ``scheduler_factory()``'s)."""
    return ServeApp(config, scheduler_factory)
