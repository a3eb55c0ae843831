"""The in-memory record of one ``sbx serve`` sandbox and of its code-interpreter contexts.

A record's state (guarded by its ``transition`` lock)::

    running --pause / deadline with auto_pause--> paused (on disk: its VMs saved, freed)
    paused --connect / resume--> running
    running | paused --kill / deadline (running only) / retention (paused only) / VM lost--> killed

A paused record has no live session (``live is None``): ``session`` raises, and daemon requests
are refused before they reach it.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.server.errors import ServeError

if TYPE_CHECKING:
    from exec_sandbox.models import Language
    from exec_sandbox.sandbox.session import Session

__all__ = ["SESSION_IDLE_S", "CodeContext", "SandboxRecord", "SandboxState"]

SESSION_IDLE_S: Final = 86400.0  # the sandbox deadline, not the session idle timer, ends a sandbox
SandboxState = Literal["running", "paused", "killed"]


@dataclass
class CodeContext:
    """One code-interpreter context: a session of ``language`` made on first use."""

    id: str
    language: Language
    cwd: str
    session: Session | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    prepared: bool = False  # Python: the result hook is defined in the session
    hidden_execs: int = 0  # execs of ours (the prelude), left out of execution_count


@dataclass
class SandboxRecord:
    sandbox_id: str
    owner: str  # sha256 digest of the API key that created it
    template_id: str
    envd_access_token: str
    live: Session | None  # None while paused (its VMs are on disk)
    metadata: dict[str, str]
    env_vars: dict[str, str]
    started_at: float
    end_at: float
    memory_mb: int
    state: SandboxState = "running"
    auto_pause: bool = False  # at its deadline the sandbox is paused (to disk), not killed
    allowed_domains: tuple[str, ...] = ()  # its egress allowlist (empty: no network)
    paused_at: float | None = None
    contexts: dict[str, CodeContext] = field(default_factory=dict)
    default_contexts: dict[str, str] = field(default_factory=dict)  # language -> context id
    next_pid: int = 1000
    command_timeout_seconds: float = 3600.0
    max_upload_bytes: int = 100 * 1024 * 1024
    max_contexts: int = 4
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    processes: dict[int, Any] = field(default_factory=dict)  # pid -> process.ProcessInfo (running)
    # Held by pause / resume / fork / snapshot / kill: one state change at a time.
    transition: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def session(self) -> Session:
        """The sandbox's shell session (502, like E2B's proxy, while the sandbox is paused)."""
        if self.live is None:
            raise ServeError(f"sandbox {self.sandbox_id!r} is paused; connect to resume it", status=502)
        return self.live

    def sessions(self) -> list[Session]:
        """Every live session of the sandbox: the shell and the contexts' VMs."""
        found = [self.live] if self.live is not None else []
        return found + [c.session for c in self.contexts.values() if c.session is not None]

    def vm_count(self) -> int:
        """VMs the sandbox holds (paused: none)."""
        return len(self.sessions())

    def iso(self, t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")

    def token_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented, self.envd_access_token)

    def new_pid(self) -> int:
        self.next_pid += 1
        return self.next_pid
