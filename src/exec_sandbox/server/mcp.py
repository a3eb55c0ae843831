"""An MCP server (the official ``mcp`` SDK) over exec_sandbox: run code, and open / use / fork / close
stateful sessions with their files.

Served by ``sbx serve`` at ``/mcp`` (streamable HTTP; the API key goes in ``X-API-KEY`` or
``Authorization: Bearer``), and over stdio by ``sbx mcp``. Tools:

- ``run_code(code, language, timeout_seconds)``: one fresh microVM, destroyed after.
- ``session_open(language)`` -> ``session_id``; ``session_exec(session_id, code)``;
  ``session_fork(session_id)`` -> a new ``session_id`` (memory + disk clone); ``session_close``.
- ``write_file`` / ``read_file`` (UTF-8 text) / ``list_files`` in a session's work dir.

Sessions close after the Scheduler's idle timeout; at most ``max_sessions`` are open at once.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Final

from mcp.server.mcpserver import MCPServer

from exec_sandbox.errors import SandboxError
from exec_sandbox.models import ExecutionResult

if TYPE_CHECKING:
    from exec_sandbox.scheduler import Scheduler
    from exec_sandbox.session import Session

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


class McpSandboxTools:
    """The state behind the tools: the Scheduler (bound when it starts) and the open sessions."""

    def __init__(self, *, max_sessions: int = 20) -> None:
        self.scheduler: Scheduler | None = None
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}

    def _scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise SandboxError("the sandbox scheduler is not running")
        return self.scheduler

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.closed:
            self.sessions.pop(session_id, None)
            raise SandboxError(f"no open session {session_id!r}")
        return session

    def _add(self, session: Session) -> str:
        sid = "s" + secrets.token_hex(8)
        self.sessions[sid] = session
        return sid

    def _check_room(self) -> None:
        for sid, s in list(self.sessions.items()):
            if s.closed:
                del self.sessions[sid]
        if len(self.sessions) >= self.max_sessions:
            raise SandboxError(f"too many open sessions (max {self.max_sessions}); close one first")

    async def aclose(self) -> None:
        sessions, self.sessions = list(self.sessions.values()), {}
        for s in sessions:
            await s.close()


def build_mcp_server(tools: McpSandboxTools) -> MCPServer:
    """An :class:`MCPServer` whose tools act through ``tools`` (bind ``tools.scheduler`` before use)."""
    server: MCPServer = MCPServer(name="sbx", instructions=_INSTRUCTIONS)

    @server.tool()
    async def run_code(code: str, language: str = "python", timeout_seconds: float = 30.0) -> dict[str, Any]:
        """Run code once in a fresh microVM (language: python, javascript or raw shell)."""
        return _result(await tools._scheduler().run(code, language=language, timeout_seconds=timeout_seconds))

    @server.tool()
    async def session_open(language: str = "python") -> dict[str, Any]:
        """Open a stateful session (a long-lived microVM); returns its session_id."""
        tools._check_room()
        session = await tools._scheduler().session(language)
        return {"session_id": tools._add(session), "language": session.language}

    @server.tool()
    async def session_exec(session_id: str, code: str, timeout_seconds: float = 30.0) -> dict[str, Any]:
        """Run code in an open session; variables and files persist between calls."""
        return _result(await tools._session(session_id).exec(code, timeout_seconds=timeout_seconds))

    @server.tool()
    async def session_fork(session_id: str) -> dict[str, Any]:
        """Clone an open session (memory and disk) into a new, independent one."""
        tools._check_room()
        child = await tools._session(session_id).fork()
        return {"session_id": tools._add(child), "language": child.language}

    @server.tool()
    async def session_close(session_id: str) -> dict[str, Any]:
        """Close a session and free its microVM."""
        session = tools.sessions.pop(session_id, None)
        if session is not None:
            await session.close()
        return {"closed": session is not None}

    @server.tool()
    async def write_file(session_id: str, path: str, content: str) -> dict[str, Any]:
        """Write a UTF-8 text file in the session's work dir."""
        data = content.encode()
        await tools._session(session_id).write_file(path, data)
        return {"path": path, "size": len(data)}

    @server.tool()
    async def read_file(session_id: str, path: str) -> dict[str, Any]:
        """Read a text file from the session's work dir (undecodable bytes are replaced)."""
        data = await tools._session(session_id).read_file(path) or b""
        return {"path": path, "content": data.decode("utf-8", errors="replace")}

    @server.tool()
    async def list_files(session_id: str, path: str = ".") -> dict[str, Any]:
        """List a directory of the session's work dir."""
        entries = await tools._session(session_id).list_files(path)
        return {"entries": [e.model_dump() for e in entries]}

    return server
