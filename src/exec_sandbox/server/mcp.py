"""An MCP server (the official ``mcp`` SDK) over exec_sandbox: run code, and open / use / fork / close
stateful sessions with their files.

Served by ``sbx serve`` at ``/mcp`` (streamable HTTP; the API key goes in ``X-API-KEY`` or
``Authorization: Bearer``), and over stdio by ``sbx mcp``. Tools:

- ``run_code(code, language, timeout_seconds, packages, allowed_domains)``: one fresh microVM,
  destroyed after.
- ``session_open(language, packages, allowed_domains)`` -> ``session_id``; ``session_exec(session_id, code)``;
  ``session_fork(session_id)`` -> a new ``session_id`` (memory + disk clone); ``session_close``.
- ``write_file`` / ``read_file`` (UTF-8 text) / ``list_files`` in a session's work dir.

Sessions close after the Scheduler's idle timeout; each belongs to the API key that opened it (over
HTTP; ``"local"`` over stdio): another key's session id is "no open session". At most
``max_sessions`` are open per key.

``packages``: requirement strings (npm specs for JavaScript), installed on the host before the VM
boots, or the ``packages`` lock a call returned (reinstalls exactly that). ``allowed_domains``: host
names the VM may reach through its egress gateway (none: no network); where they resolve and whether
private addresses are allowed is the Scheduler's config (``sbx serve``'s ``host_overrides`` /
``egress_allow_private``), never the caller's.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from exec_sandbox.errors import SandboxError, SandboxInputError
from exec_sandbox.models import ExecutionResult
from exec_sandbox.packages import PackageLock

if TYPE_CHECKING:
    from exec_sandbox.sandbox.scheduler import Scheduler
    from exec_sandbox.sandbox.session import Session

__all__ = ["McpSandboxTools", "build_mcp_server"]

_INSTRUCTIONS: Final = (
    "Runs untrusted Python, JavaScript or shell ('raw') code in throwaway microVMs. Use run_code for "
    "one-off snippets; session_open/session_exec to keep state (variables, files) between calls."
)


def _result(r: ExecutionResult) -> dict[str, Any]:
    return {
        "stdout": r.stdout,
        "stderr": r.stderr,
        "exit_code": r.exit_code,
        "timed_out": r.timed_out,
        "execution_time_ms": round(r.execution_time_ms, 1),
    }


def _packages(packages: list[str] | dict[str, Any] | None) -> list[str] | PackageLock | None:
    """Requirement strings as they are; a mapping is a lock a call returned."""
    if not isinstance(packages, dict):
        return packages
    try:
        return PackageLock.model_validate(packages)
    except ValueError as exc:
        raise SandboxInputError(
            f"packages: not a package lock: {exc}", context={"field": "packages"}
        ) from None


def _lock(lock: PackageLock | None) -> dict[str, Any] | None:
    return None if lock is None else lock.model_dump(mode="json")


class McpSandboxTools:
    """The state behind the tools: the Scheduler (bound when it starts) and the open sessions."""

    def __init__(self, *, max_sessions: int = 20) -> None:
        self.scheduler: Scheduler | None = None
        self.max_sessions = max_sessions
        self.sessions: dict[str, tuple[str, Session]] = {}  # id -> (owner, session)

    def _scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise SandboxError("the sandbox scheduler is not running")
        return self.scheduler

    def _session(self, owner: str, session_id: str) -> Session:
        found = self.sessions.get(session_id)
        if found is None or found[0] != owner or found[1].closed:
            if found is not None and found[1].closed:
                del self.sessions[session_id]
            raise SandboxError(f"no open session {session_id!r}")
        return found[1]

    def _add(self, owner: str, session: Session) -> str:
        sid = "s" + secrets.token_hex(12)
        self.sessions[sid] = (owner, session)
        return sid

    def _pop(self, owner: str, session_id: str) -> Session | None:
        found = self.sessions.get(session_id)
        if found is None or found[0] != owner:
            return None
        del self.sessions[session_id]
        return found[1]

    def _check_room(self, owner: str) -> None:
        for sid, (_, s) in list(self.sessions.items()):
            if s.closed:
                del self.sessions[sid]
        if sum(1 for o, _ in self.sessions.values() if o == owner) >= self.max_sessions:
            raise SandboxError(f"too many open sessions (max {self.max_sessions}); close one first")

    async def aclose(self) -> None:
        sessions, self.sessions = list(self.sessions.values()), {}
        for _, s in sessions:
            await s.close()


def _owner(ctx: Context) -> str:
    """The API key digest ``sbx serve`` put in the HTTP request's scope; ``"local"`` over stdio."""
    try:
        request = ctx.request_context.request
    except (AttributeError, LookupError, ValueError):
        request = None
    scope = getattr(request, "scope", None)
    owner = scope.get("state", {}).get("owner") if isinstance(scope, dict) else None
    return owner if isinstance(owner, str) and owner else "local"


@contextlib.contextmanager
def _clear_errors() -> Iterator[None]:
    """Our errors reach the MCP client with their message (others are masked by the SDK)."""
    try:
        yield
    except SandboxError as exc:
        field = exc.context.get("field")
        where = f" (field: {field})" if isinstance(field, str) and field not in exc.message else ""
        raise ToolError(f"{type(exc).__name__}: {exc.message}{where}") from exc


def build_mcp_server(tools: McpSandboxTools) -> MCPServer:
    """An :class:`MCPServer` whose tools act through ``tools`` (bind ``tools.scheduler`` before use)."""
    server: MCPServer = MCPServer(name="sbx", instructions=_INSTRUCTIONS)

    @server.tool()
    async def run_code(
        code: str,
        language: str = "python",
        timeout_seconds: float = 30.0,
        packages: list[str] | dict[str, Any] | None = None,
        allowed_domains: list[str] | None = None,
    ) -> dict[str, Any]:
        """Run code once in a fresh microVM (language: python, javascript or raw shell).
        packages: requirements to install first (or a returned lock); allowed_domains: hosts it may reach."""
        with _clear_errors():
            scheduler = tools._scheduler()
            result = await scheduler.run(
                code, language=language, timeout_seconds=timeout_seconds, packages=_packages(packages),
                allowed_domains=allowed_domains or None,
            )
            return {**_result(result), "packages": _lock(result.packages)}

    @server.tool()
    async def session_open(
        ctx: Context,
        language: str = "python",
        packages: list[str] | dict[str, Any] | None = None,
        allowed_domains: list[str] | None = None,
    ) -> dict[str, Any]:
        """Open a stateful session (a long-lived microVM); returns its session_id.
        packages: requirements to install first (or a returned lock); allowed_domains: hosts it may reach."""
        with _clear_errors():
            owner = _owner(ctx)
            tools._check_room(owner)
            session = await tools._scheduler().session(
                language, packages=_packages(packages), allowed_domains=allowed_domains or None
            )
            return {
                "session_id": tools._add(owner, session),
                "language": session.language,
                "packages": _lock(session.packages),
            }

    @server.tool()
    async def session_exec(
        ctx: Context, session_id: str, code: str, timeout_seconds: float = 30.0
    ) -> dict[str, Any]:
        """Run code in an open session; variables and files persist between calls."""
        with _clear_errors():
            session = tools._session(_owner(ctx), session_id)
            return _result(await session.exec(code, timeout_seconds=timeout_seconds))

    @server.tool()
    async def session_fork(ctx: Context, session_id: str) -> dict[str, Any]:
        """Clone an open session (memory and disk) into a new, independent one."""
        with _clear_errors():
            owner = _owner(ctx)
            tools._check_room(owner)
            child = await tools._session(owner, session_id).fork()
            return {"session_id": tools._add(owner, child), "language": child.language}

    @server.tool()
    async def session_close(ctx: Context, session_id: str) -> dict[str, Any]:
        """Close a session and free its microVM."""
        with _clear_errors():
            session = tools._pop(_owner(ctx), session_id)
            if session is not None:
                await session.close()
            return {"closed": session is not None}

    @server.tool()
    async def write_file(ctx: Context, session_id: str, path: str, content: str) -> dict[str, Any]:
        """Write a UTF-8 text file in the session's work dir."""
        with _clear_errors():
            data = content.encode()
            await tools._session(_owner(ctx), session_id).write_file(path, data)
            return {"path": path, "size": len(data)}

    @server.tool()
    async def read_file(ctx: Context, session_id: str, path: str) -> dict[str, Any]:
        """Read a text file from the session's work dir (undecodable bytes are replaced)."""
        with _clear_errors():
            data = await tools._session(_owner(ctx), session_id).read_file(path) or b""
            return {"path": path, "content": data.decode("utf-8", errors="replace")}

    @server.tool()
    async def list_files(ctx: Context, session_id: str, path: str = ".") -> dict[str, Any]:
        """List a directory of the session's work dir."""
        with _clear_errors():
            entries = await tools._session(_owner(ctx), session_id).list_files(path)
            return {"entries": [e.model_dump() for e in entries]}

    return server
