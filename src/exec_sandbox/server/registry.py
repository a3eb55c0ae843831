"""The sandboxes of ``sbx serve``: who owns each, when it dies, and the sessions behind it.

A sandbox is one long-lived ``raw`` (shell) :class:`~exec_sandbox.sandbox.session.Session` from the
:class:`~exec_sandbox.sandbox.scheduler.Scheduler`, plus code-interpreter contexts (each a session of its own
language, made on first use). Every sandbox belongs to the API key (sha256 digest) that created it:
lookups take the owner, so another key's sandbox is simply "not found". A reaper kills sandboxes at
their deadline (``endAt``) and forgets those whose VM died.

Lifecycle of a :class:`SandboxRecord` (``state``)::

    running --pause--> paused --connect / resume--> running
    running | paused --kill / deadline (running only) / VM lost / server shutdown--> killed

``paused`` freezes the sandbox's VMs in place (QMP ``stop``): their memory stays on this host, the
deadline stops counting, and they are gone when the server stops (not yet written to disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.egress.accounting import EgressStats
from exec_sandbox.server import metrics
from exec_sandbox.server.config import ServeConfig
from exec_sandbox.server.errors import (
    BadRequestError,
    NotFoundError,
    QuotaExceededError,
    ServeError,
    UnauthorizedError,
)

if TYPE_CHECKING:
    from exec_sandbox.models import Language
    from exec_sandbox.sandbox.scheduler import Scheduler
    from exec_sandbox.sandbox.session import Session

__all__ = [
    "ENVD_VERSION",
    "TEMPLATES",
    "CodeContext",
    "SandboxRecord",
    "SandboxRegistry",
]

logger = logging.getLogger(__name__)

# The envd version we claim: >= 0.4.0 (no default-user header), >= 0.5.7 (octet-stream uploads).
ENVD_VERSION: Final = "0.5.7"
# Templates we serve; each is a shell sandbox (the code interpreter adds Python/JS contexts on demand).
TEMPLATES: Final = frozenset({"base", "code-interpreter-v1", "code-interpreter", "code-interpreter-beta"})
CLIENT_ID: Final = "sbx-serve"
_SESSION_IDLE_S: Final = 86400.0  # the sandbox deadline, not the session idle timer, ends a sandbox


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
    session: Session
    metadata: dict[str, str]
    env_vars: dict[str, str]
    started_at: float
    end_at: float
    memory_mb: int
    state: Literal["running", "paused", "killed"] = "running"
    contexts: dict[str, CodeContext] = field(default_factory=dict)
    default_contexts: dict[str, str] = field(default_factory=dict)  # language -> context id
    next_pid: int = 1000
    command_timeout_seconds: float = 3600.0
    max_upload_bytes: int = 100 * 1024 * 1024
    max_contexts: int = 4
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    processes: dict[int, Any] = field(default_factory=dict)  # pid -> process.ProcessInfo (running)
    # pid -> (its exec task, time.monotonic() at start)
    process_tasks: dict[int, tuple[asyncio.Task[Any], float]] = field(default_factory=dict)

    def iso(self, t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")

    def token_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented, self.envd_access_token)

    def new_pid(self) -> int:
        self.next_pid += 1
        return self.next_pid


class SandboxRegistry:
    """Creates, finds, times out and kills sandboxes on one :class:`Scheduler`."""

    def __init__(self, scheduler: Scheduler, config: ServeConfig) -> None:
        self.scheduler = scheduler
        self.config = config
        self._records: dict[str, SandboxRecord] = {}
        self._pending: dict[str, int] = {}  # owner -> creations in flight (they count for the quota)
        self._pending_mb: dict[str, int] = {}  # owner -> MiB of context VMs being made
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="sbx-serve-reaper")

    async def aclose(self) -> None:
        """Kill every sandbox and stop the reaper. Idempotent."""
        self._closing = True
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        for record in list(self._records.values()):
            await self._kill(record, "server shutdown")

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval_seconds)
            now = time.time()
            for record in list(self._records.values()):
                if record.state == "running" and record.end_at <= now:
                    await self._kill(record, "timeout")
                elif record.session.closed:
                    await self._kill(record, f"session closed ({record.session.close_reason})")

    # ------------------------------------------------------------------ queries

    def memory_mb(self, owner: str) -> int:
        """Guest RAM held by ``owner``'s sandboxes, their contexts and creations in flight."""
        held = 0
        for r in self._records.values():
            if r.owner == owner:
                held += r.memory_mb * (1 + sum(1 for c in r.contexts.values() if c.session is not None))
        return held + self._pending.get(owner, 0) * self.config.memory_mb + self._pending_mb.get(owner, 0)

    def reserve_memory(self, owner: str, memory_mb: int) -> None:
        """Raise 429 when ``memory_mb`` more would pass the key's memory quota."""
        limit = self.config.max_memory_mb_per_key
        if limit is not None and self.memory_mb(owner) + memory_mb > limit:
            raise QuotaExceededError(
                f"quota exceeded: this API key may hold {limit} MiB of sandbox memory at once",
                context={"limit_mb": limit},
            )

    @contextlib.asynccontextmanager
    async def context_vm(self, owner: str, memory_mb: int) -> AsyncIterator[None]:
        """Count a context VM being made against the key's memory quota (429 if it does not fit)."""
        self.reserve_memory(owner, memory_mb)
        self._pending_mb[owner] = self._pending_mb.get(owner, 0) + memory_mb
        try:
            yield
        finally:
            self._pending_mb[owner] -= memory_mb
            if not self._pending_mb[owner]:
                del self._pending_mb[owner]

    def count(self, owner: str | None = None) -> int:
        return sum(1 for r in self._records.values() if owner is None or r.owner == owner)

    def creating(self) -> int:
        return sum(self._pending.values())

    def egress_stats(self) -> list[EgressStats]:
        """Egress counters of every live networked session (sandboxes and their code contexts)."""
        sessions = [r.session for r in self._records.values()]
        sessions += [c.session for r in self._records.values() for c in r.contexts.values() if c.session]
        return [st for st in (s.egress_stats for s in sessions) if st is not None]

    def records(self, owner: str) -> list[SandboxRecord]:
        return sorted(
            (r for r in self._records.values() if r.owner == owner and r.state != "killed"),
            key=lambda r: (r.started_at, r.sandbox_id),
        )

    def get(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """The caller's running sandbox, or NotFoundError (also for another key's sandbox)."""
        record = self._records.get(sandbox_id)
        if record is None or record.owner != owner or record.state == "killed":
            raise NotFoundError(f"sandbox {sandbox_id!r} not found", context={"sandbox_id": sandbox_id})
        return record

    def for_token(self, sandbox_id: str, token: str | None) -> SandboxRecord:
        """The sandbox a daemon (envd / interpreter) request is for, checked against its access token."""
        record = self._records.get(sandbox_id)
        if record is None or record.state == "killed":
            raise NotFoundError(f"sandbox {sandbox_id!r} not found", context={"sandbox_id": sandbox_id})
        if not record.token_ok(token):
            raise UnauthorizedError("missing or invalid access token", context={"sandbox_id": sandbox_id})
        if record.state == "paused":  # E2B's proxy: 502 for a sandbox that is not running
            raise ServeError(f"sandbox {sandbox_id!r} is paused; connect to resume it", status=502)
        return record

    # ------------------------------------------------------------------ changes

    def _clamp_timeout(self, timeout: int | None) -> int:
        if timeout is None:
            return self.config.default_sandbox_timeout_seconds
        if timeout < 0:
            raise BadRequestError("timeout must be >= 0 seconds")
        return min(timeout, self.config.max_sandbox_timeout_seconds)

    async def create(
        self,
        owner: str,
        *,
        template_id: str,
        timeout: int | None,
        metadata: Mapping[str, str] | None,
        env_vars: Mapping[str, str] | None,
    ) -> SandboxRecord:
        if template_id not in TEMPLATES:
            raise NotFoundError(
                f"template {template_id!r} not found (available: {', '.join(sorted(TEMPLATES))})",
                context={"template_id": template_id},
            )
        seconds = self._clamp_timeout(timeout)
        in_use = self.count(owner) + self._pending.get(owner, 0)
        if in_use >= self.config.max_sandboxes_per_key:
            raise QuotaExceededError(
                f"quota exceeded: this API key may run {self.config.max_sandboxes_per_key} sandboxes at once",
                context={"limit": self.config.max_sandboxes_per_key},
            )
        self.reserve_memory(owner, self.config.memory_mb)
        self._pending[owner] = self._pending.get(owner, 0) + 1
        started = time.perf_counter()
        try:
            session = await self.scheduler.session(
                "raw",
                memory_mb=self.config.memory_mb,
                env_vars=dict(env_vars or {}),
                idle_timeout_seconds=_SESSION_IDLE_S,
            )
        finally:
            self._pending[owner] -= 1
            if not self._pending[owner]:
                del self._pending[owner]
        metrics.observe_create(time.perf_counter() - started)
        now = time.time()
        record = SandboxRecord(
            sandbox_id="i" + secrets.token_hex(10),
            owner=owner,
            template_id=template_id,
            envd_access_token=secrets.token_urlsafe(24),
            session=session,
            metadata=dict(metadata or {}),
            env_vars=dict(env_vars or {}),
            started_at=now,
            end_at=now + seconds,
            memory_mb=self.config.memory_mb,
            command_timeout_seconds=self.config.command_timeout_seconds,
            max_upload_bytes=self.config.max_upload_bytes,
            max_contexts=self.config.max_contexts_per_sandbox,
            scheduler_config=self.scheduler.config,
        )
        if self._closing:
            await session.close()
            raise ServeError("the server is shutting down", status=503)
        self._records[record.sandbox_id] = record
        logger.info("sandbox %s created (template %s, vm %s)", record.sandbox_id, template_id, session.vm_id)
        return record

    def set_timeout(self, record: SandboxRecord, timeout: int) -> None:
        """The sandbox now dies ``timeout`` seconds from now (E2B semantics: may shorten it)."""
        record.end_at = time.time() + self._clamp_timeout(timeout)

    def extend_timeout(self, record: SandboxRecord, timeout: int | None) -> None:
        """``connect``: the deadline becomes at least ``timeout`` seconds from now."""
        if timeout is not None:
            record.end_at = max(record.end_at, time.time() + self._clamp_timeout(timeout))

    async def pause(self, record: SandboxRecord) -> None:
        """Freeze every VM of the sandbox once its running calls are done (409 if already paused)."""
        if record.state == "paused":
            raise ServeError(f"sandbox {record.sandbox_id!r} is already paused", status=409)
        sessions = [record.session, *(c.session for c in record.contexts.values() if c.session)]
        record.state = "paused"  # daemon requests are refused from now on
        for session in sessions:
            async with session.exclusive() as vm:
                await vm.pause()
        logger.info("sandbox %s paused", record.sandbox_id)

    async def resume(self, record: SandboxRecord, timeout: int | None) -> None:
        """Thaw a paused sandbox; its deadline restarts from now. A running one is left alone."""
        if record.state != "paused":
            return
        sessions = [record.session, *(c.session for c in record.contexts.values() if c.session)]
        for session in sessions:
            await session.vm.resume()
        record.state = "running"
        record.end_at = time.time() + self._clamp_timeout(timeout)
        logger.info("sandbox %s resumed", record.sandbox_id)

    async def kill(self, owner: str, sandbox_id: str) -> None:
        await self._kill(self.get(owner, sandbox_id), "killed")

    async def _kill(self, record: SandboxRecord, reason: str) -> None:
        if self._records.pop(record.sandbox_id, None) is None:
            return
        record.state = "killed"
        logger.info("sandbox %s ends: %s", record.sandbox_id, reason)
        sessions = [record.session, *(c.session for c in record.contexts.values() if c.session)]
        for session in sessions:
            try:
                if not session.closed and session.vm.state.value == "paused":
                    await session.vm.resume()  # a frozen guest cannot shut down gracefully
                await session.close()
            except Exception:  # the VM is going away either way; log and go on with the others
                logger.exception("closing a session of sandbox %s failed", record.sandbox_id)
