"""The sandboxes of ``sbx serve``: who owns each, when it dies, and the sessions behind it.

A sandbox is one long-lived ``raw`` (shell) :class:`~exec_sandbox.sandbox.session.Session` from the
:class:`~exec_sandbox.sandbox.scheduler.Scheduler`, plus code-interpreter contexts (each a session of its own
language, made on first use). Every sandbox belongs to the API key (sha256 digest) that created it:
lookups take the owner, so another key's sandbox is simply "not found". A reaper kills sandboxes at
their deadline (``endAt``), deletes paused ones past ``paused_retention_seconds`` and forgets those
whose VM died. Lifecycle: see :mod:`exec_sandbox.server.records`.

Pause writes every VM of the sandbox (memory + disk) to the state dir
(:mod:`exec_sandbox.server.persistence`) and frees them: a paused sandbox holds no memory and counts
against no quota; its deadline stops. It survives a restart of the server (a restarted server lists
it as paused and resumes it with its processes' memory and files intact); a *running* sandbox of a
server that was killed is gone (its VMs died with the server). Connect / resume restores the VMs.

Fork saves the sandbox once and restores it ``count`` times (new ids, same owner); a snapshot
template is such a save kept under ``templates/``: ``create`` with its id restores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

from exec_sandbox.egress.accounting import EgressStats
from exec_sandbox.errors import SandboxError
from exec_sandbox.server import metrics
from exec_sandbox.server.config import ServeConfig
from exec_sandbox.server.errors import (
    BadRequestError,
    NotFoundError,
    QuotaExceededError,
    ServeError,
    UnauthorizedError,
)
from exec_sandbox.server.logs import owner_tag
from exec_sandbox.server.network import refuse_saving_networked
from exec_sandbox.server.persistence import EntryKind, SavedSandbox, StateStore
from exec_sandbox.server.records import SESSION_IDLE_S, CodeContext, SandboxRecord
from exec_sandbox.server.snapshotting import (
    check_quiet,
    restore_sandbox,
    save_sandbox,
    saved_record,
    stop_commands,
)
from smartvm.cleanup import shielded

if TYPE_CHECKING:
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


class SandboxRegistry:
    """Creates, finds, pauses, forks, times out and kills sandboxes on one :class:`Scheduler`."""

    def __init__(self, scheduler: Scheduler, config: ServeConfig) -> None:
        self.scheduler = scheduler
        self.config = config
        self.store = StateStore(config.resolved_state_dir())
        self._records: dict[str, SandboxRecord] = {}
        self._paused: dict[str, SavedSandbox] = {}  # sandbox id -> what is on disk
        self._templates: dict[str, SavedSandbox] = {}  # template id -> snapshot template
        self._template_users: dict[str, int] = {}  # template id -> creations restoring it now
        self._saving: dict[str, int] = {}  # owner -> pauses / snapshots being written
        self._pending: dict[str, int] = {}  # owner -> creations in flight (they count for the quota)
        self._pending_mb: dict[str, int] = {}  # owner -> MiB of VMs being made
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the state dir (paused sandboxes and templates of earlier runs) and start the reaper."""
        if self._reaper is not None:
            return
        self.store.open()
        for saved in self.store.load("sandboxes"):
            self._paused[saved.id] = saved
            self._records[saved.id] = self._paused_record(saved)
        self._templates = {saved.id: saved for saved in self.store.load("templates")}
        if self._paused or self._templates:
            logger.info(
                "state dir %s: %d paused sandboxes, %d snapshot templates",
                self.store.root,
                len(self._paused),
                len(self._templates),
            )
        self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="sbx-serve-reaper")

    async def aclose(self) -> None:
        """Kill every running sandbox (paused ones stay on disk) and stop the reaper. Idempotent."""
        self._closing = True
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        for record in list(self._records.values()):
            await self._kill(record, "server shutdown", keep_paused=True)
        self.store.close()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval_seconds)
            now = time.time()
            for record in list(self._records.values()):
                if record.transition.locked():
                    continue  # being paused / resumed / forked: looked at next round
                if record.state == "running" and record.end_at <= now:
                    await self._deadline(record)
                elif record.state == "running" and record.live is not None and record.live.closed:
                    await self._kill(record, f"session closed ({record.live.close_reason})")
                elif record.state == "paused" and (record.paused_at or now) + self._retention <= now:
                    await self._kill(record, "paused past its retention")

    async def _deadline(self, record: SandboxRecord) -> None:
        """Kill the sandbox, or pause it when it was created with ``autoPause`` (killed if that fails)."""
        if not record.auto_pause:
            await self._kill(record, "timeout")
            return
        try:
            await self.pause(record)
        except SandboxError as exc:
            logger.warning("auto-pause of sandbox %s failed (%s); killing it", record.sandbox_id, exc.message)
            await self._kill(record, "timeout (auto-pause failed)")

    @property
    def _retention(self) -> int:
        return self.config.paused_retention_seconds

    # ------------------------------------------------------------------ queries

    def memory_mb(self, owner: str) -> int:
        """Guest RAM held by ``owner``'s sandboxes (paused ones hold none) and VMs being made."""
        held = sum(r.memory_mb * r.vm_count() for r in self._records.values() if r.owner == owner)
        return held + self._pending_mb.get(owner, 0)

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
        async with self._admitting(owner, sandboxes=0, memory_mb=memory_mb):
            yield

    @contextlib.asynccontextmanager
    async def _admitting(self, owner: str, *, sandboxes: int, memory_mb: int) -> AsyncIterator[None]:
        """Check the key's quotas for ``sandboxes`` more running sandboxes holding ``memory_mb`` and
        count them as in flight meanwhile (429 if they do not fit)."""
        if sandboxes:
            limit = self.config.max_sandboxes_per_key
            if self.count(owner) + self._pending.get(owner, 0) + sandboxes > limit:
                raise QuotaExceededError(
                    f"quota exceeded: this API key may run {limit} sandboxes at once",
                    context={"limit": limit},
                )
        self.reserve_memory(owner, memory_mb)
        self._pending[owner] = self._pending.get(owner, 0) + sandboxes
        self._pending_mb[owner] = self._pending_mb.get(owner, 0) + memory_mb
        try:
            yield
        finally:
            self._pending[owner] -= sandboxes
            self._pending_mb[owner] -= memory_mb
            if not self._pending[owner] and not self._pending_mb[owner]:
                del self._pending[owner], self._pending_mb[owner]

    def count(self, owner: str | None = None) -> int:
        """Running sandboxes (of ``owner``); paused ones do not count."""
        return sum(
            1 for r in self._records.values() if r.state == "running" and (owner is None or r.owner == owner)
        )

    def paused_count(self) -> int:
        return sum(1 for r in self._records.values() if r.state == "paused")

    def creating(self) -> int:
        return sum(self._pending.values())

    def egress_stats(self) -> list[EgressStats]:
        """Egress counters of every live networked session (sandboxes and their code contexts)."""
        # sessions(): the live ones only (a paused sandbox has none; r.session would raise)
        sessions = [s for r in self._records.values() for s in r.sessions()]
        return [st for st in (s.egress_stats for s in sessions) if st is not None]

    def records(self, owner: str) -> list[SandboxRecord]:
        return sorted(
            (r for r in self._records.values() if r.owner == owner and r.state != "killed"),
            key=lambda r: (r.started_at, r.sandbox_id),
        )

    def get(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """The caller's sandbox, or NotFoundError (also for another key's sandbox)."""
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

    def template(self, owner: str, template_id: str) -> SavedSandbox:
        """The caller's snapshot template of that id or name, or NotFoundError (also for another key's)."""
        saved = self._templates.get(template_id)
        if saved is None:
            named = [t for t in self.templates(owner) if t.name == template_id.removesuffix(":default")]
            saved = named[-1] if named else None
        if saved is None or saved.owner != owner:
            raise NotFoundError(
                f"template {template_id!r} not found (available: {', '.join(sorted(TEMPLATES))} "
                "and this key's snapshot templates)",
                context={"template_id": template_id},
            )
        return saved

    def templates(self, owner: str) -> list[SavedSandbox]:
        return sorted((t for t in self._templates.values() if t.owner == owner), key=lambda t: t.saved_at)

    # ------------------------------------------------------------------ create

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
        auto_pause: bool = False,
        allowed_domains: tuple[str, ...] = (),
    ) -> SandboxRecord:
        """``allowed_domains``: the hosts its egress gateway lets through (empty: no network)."""
        record = await self._create(owner, template_id, timeout, metadata, env_vars, allowed_domains)
        record.auto_pause = auto_pause
        return record

    async def _create(
        self,
        owner: str,
        template_id: str,
        timeout: int | None,
        metadata: Mapping[str, str] | None,
        env_vars: Mapping[str, str] | None,
        allowed_domains: tuple[str, ...],
    ) -> SandboxRecord:
        saved = None if template_id in TEMPLATES else self.template(owner, template_id)
        seconds = self._clamp_timeout(timeout)
        if saved is not None:
            refuse_saving_networked(allowed_domains, "restored from a snapshot template")
            return await self._create_from_template(owner, saved, seconds, metadata, env_vars)
        started = time.perf_counter()
        async with self._admitting(owner, sandboxes=1, memory_mb=self.config.memory_mb):
            session = await self.scheduler.session(
                "raw",
                memory_mb=self.config.memory_mb,
                env_vars=dict(env_vars or {}),
                idle_timeout_seconds=SESSION_IDLE_S,
                allowed_domains=allowed_domains or None,
            )
            metrics.observe_create(time.perf_counter() - started)
            record = await self._register(
                owner, template_id, session, {}, dict(metadata or {}), dict(env_vars or {}), seconds
            )
            record.allowed_domains = allowed_domains
            return record

    async def _create_from_template(
        self, owner: str, saved: SavedSandbox, seconds: int, metadata: Mapping[str, str] | None,
        env_vars: Mapping[str, str] | None,
    ) -> SandboxRecord:
        """A sandbox restored from the snapshot template ``saved`` (the key's own)."""
        template_id = saved.id
        env = {**saved.env_vars, **(env_vars or {})}
        started = time.perf_counter()
        vms = 1 + sum(c.snapshot for c in saved.contexts)
        self._template_users[template_id] = self._template_users.get(template_id, 0) + 1
        try:
            async with self._admitting(owner, sandboxes=1, memory_mb=vms * saved.memory_mb):
                directory = self.store.path("templates", template_id)
                session, contexts = await restore_sandbox(self.scheduler, directory, saved.contexts, env)
                metrics.observe_create(time.perf_counter() - started)
                meta = {**saved.metadata, **(metadata or {})}
                record = await self._register(owner, template_id, session, contexts, meta, env, seconds)
        finally:
            self._template_users[template_id] -= 1
        record.default_contexts = dict(saved.default_contexts)
        return record

    async def _register(
        self,
        owner: str,
        template_id: str,
        session: Session,
        contexts: dict[str, CodeContext],
        metadata: dict[str, str],
        env_vars: dict[str, str],
        seconds: int,
    ) -> SandboxRecord:
        """A new running record around live sessions (closed instead if the server is closing)."""
        now = time.time()
        record = SandboxRecord(
            sandbox_id="i" + secrets.token_hex(10),
            owner=owner,
            template_id=template_id,
            envd_access_token=secrets.token_urlsafe(24),
            live=session,
            contexts=contexts,
            metadata=metadata,
            env_vars=env_vars,
            started_at=now,
            end_at=now + seconds,
            memory_mb=session.memory_mb,
            command_timeout_seconds=self.config.command_timeout_seconds,
            max_upload_bytes=self.config.max_upload_bytes,
            max_contexts=self.config.max_contexts_per_sandbox,
            scheduler_config=self.scheduler.config,
        )
        if self._closing:
            await _close_all(record.sessions())
            raise ServeError("the server is shutting down", status=503)
        self._records[record.sandbox_id] = record
        logger.info(
            "sandbox %s created (template %s, vm %s)", record.sandbox_id, template_id, session.vm_id,
            extra=_ids(record),
        )
        return record

    def _paused_record(self, saved: SavedSandbox) -> SandboxRecord:
        """The record of a sandbox paused by an earlier server (a fresh access token: none is stored)."""
        return SandboxRecord(
            sandbox_id=saved.id,
            owner=saved.owner,
            template_id=saved.template_id,
            envd_access_token=secrets.token_urlsafe(24),
            live=None,
            metadata=dict(saved.metadata),
            env_vars=dict(saved.env_vars),
            started_at=saved.started_at,
            end_at=saved.end_at,
            memory_mb=saved.memory_mb,
            state="paused",
            paused_at=saved.saved_at,
            contexts={c.id: CodeContext(id=c.id, language=c.language, cwd=c.cwd) for c in saved.contexts},
            default_contexts=dict(saved.default_contexts),
            next_pid=saved.next_pid,
            auto_pause=saved.auto_pause,
            command_timeout_seconds=self.config.command_timeout_seconds,
            max_upload_bytes=self.config.max_upload_bytes,
            max_contexts=self.config.max_contexts_per_sandbox,
            scheduler_config=self.scheduler.config,
        )

    # ------------------------------------------------------------------ deadlines

    def set_timeout(self, record: SandboxRecord, timeout: int) -> None:
        """The sandbox now dies ``timeout`` seconds from now (E2B semantics: may shorten it)."""
        record.end_at = time.time() + self._clamp_timeout(timeout)

    def extend_timeout(self, record: SandboxRecord, timeout: int | None) -> None:
        """``connect``: the deadline becomes at least ``timeout`` seconds from now."""
        if timeout is not None:
            record.end_at = max(record.end_at, time.time() + self._clamp_timeout(timeout))

    # ------------------------------------------------------------------ pause / resume

    async def _save(
        self, record: SandboxRecord, kind: EntryKind, entry_id: str, *, name: str | None = None
    ) -> tuple[Path, SavedSandbox]:
        """Save every VM of the running ``record`` as the complete entry ``kind/entry_id``."""
        staging = await asyncio.to_thread(self.store.staging, kind, entry_id)
        try:
            contexts = await save_sandbox(record, staging)
            saved = saved_record(record, entry_id, contexts).model_copy(update={"name": name})
            return await asyncio.to_thread(self.store.commit, kind, staging, saved), saved
        except BaseException:
            await shielded(asyncio.to_thread(self.store.discard, staging))
            raise

    @contextlib.contextmanager
    def _save_slot(self, owner: str) -> Iterator[None]:
        """Room on disk for one more paused sandbox or template of ``owner`` (429 when the key keeps
        ``max_saved_per_key`` already), held while it is written."""
        limit = self.config.max_saved_per_key
        kept = sum(1 for r in self._records.values() if r.owner == owner and r.state == "paused")
        kept += sum(1 for t in self._templates.values() if t.owner == owner)
        if kept + self._saving.get(owner, 0) >= limit:
            raise QuotaExceededError(
                f"quota exceeded: this API key may keep {limit} paused sandboxes and snapshot templates",
                context={"limit": limit},
            )
        self._saving[owner] = self._saving.get(owner, 0) + 1
        try:
            yield
        finally:
            self._saving[owner] -= 1

    async def pause(self, record: SandboxRecord) -> None:
        """Save the sandbox's VMs to disk once their running calls are done, then free them
        (409 if already paused)."""
        async with record.transition:
            self._check_live(record)
            if record.state == "paused":
                raise ServeError(f"sandbox {record.sandbox_id!r} is already paused", status=409)
            refuse_saving_networked(record.allowed_domains, "paused")
            with self._save_slot(record.owner):
                record.state = "paused"  # daemon requests are refused from now on
                try:
                    # Commands cannot be reconnected to after a resume (no Process.Connect), and a
                    # restored guest would answer their execs to a host that no longer waits for them.
                    await stop_commands(record)
                    _, saved = await self._save(record, "sandboxes", record.sandbox_id)
                except BaseException:
                    record.state = "running"
                    raise
            record.paused_at = saved.saved_at
            self._paused[record.sandbox_id] = saved
            sessions = record.sessions()
            record.live = None
            for ctx in record.contexts.values():
                ctx.session = None
            await _close_all(sessions)
        logger.info(
            "sandbox %s paused to disk (%d VMs saved, freed)", record.sandbox_id, len(sessions),
            extra=_ids(record),
        )

    async def resume(self, record: SandboxRecord, timeout: int | None) -> None:
        """Restore a paused sandbox's VMs; its deadline restarts from now. A running one is left alone.
        429 when the key's quotas do not leave room for it."""
        async with record.transition:
            self._check_live(record)
            if record.state != "paused":
                return
            saved = self._paused[record.sandbox_id]
            vms = 1 + sum(c.snapshot for c in saved.contexts)
            directory = self.store.path("sandboxes", record.sandbox_id)
            async with self._admitting(record.owner, sandboxes=1, memory_mb=vms * record.memory_mb):
                session, contexts = await restore_sandbox(
                    self.scheduler, directory, saved.contexts, record.env_vars
                )
                record.live, record.contexts = session, contexts
                record.state, record.paused_at = "running", None
            record.end_at = time.time() + self._clamp_timeout(timeout)
            del self._paused[record.sandbox_id]
            await shielded(asyncio.to_thread(self.store.discard, directory))
        logger.info("sandbox %s resumed from disk", record.sandbox_id, extra=_ids(record))

    def _check_live(self, record: SandboxRecord) -> None:
        if record.state == "killed":
            sid = record.sandbox_id
            raise NotFoundError(f"sandbox {sid!r} not found", context={"sandbox_id": sid})

    # ------------------------------------------------------------------ fork / templates

    async def fork(
        self, record: SandboxRecord, count: int, timeout: int | None
    ) -> list[SandboxRecord | SandboxError]:
        """``count`` new running sandboxes of the same owner, each a clone (memory + disk) of
        ``record`` now: saved once, restored ``count`` times. Like E2B, each fork succeeds or fails
        on its own (e.g. a 429 once the key's quota is used up): one result per fork."""
        if not 1 <= count <= self.config.max_fork_count:
            raise BadRequestError(f"count must be between 1 and {self.config.max_fork_count}")
        seconds = self._clamp_timeout(timeout)
        refuse_saving_networked(record.allowed_domains, "forked")
        results: list[SandboxRecord | SandboxError] = []
        async with record.transition:
            self._check_live(record)
            check_quiet(record)
            staging = await asyncio.to_thread(self.store.staging, "sandboxes", record.sandbox_id)
            try:
                contexts = await save_sandbox(record, staging)
                vms = 1 + sum(c.snapshot for c in contexts)
                for _ in range(count):
                    try:
                        held = vms * record.memory_mb
                        async with self._admitting(record.owner, sandboxes=1, memory_mb=held):
                            session, ctxs = await restore_sandbox(
                                self.scheduler, staging, contexts, record.env_vars
                            )
                            child = await self._register(
                                record.owner, record.template_id, session, ctxs,
                                dict(record.metadata), dict(record.env_vars), seconds,
                            )
                    except SandboxError as exc:
                        results.append(exc)
                        continue
                    child.default_contexts = dict(record.default_contexts)
                    child.next_pid = record.next_pid
                    child.auto_pause = record.auto_pause
                    results.append(child)
            finally:
                await shielded(asyncio.to_thread(self.store.discard, staging))
        made = [r.sandbox_id for r in results if isinstance(r, SandboxRecord)]
        logger.info(
            "sandbox %s forked into %d of %d: %s", record.sandbox_id, len(made), count, made,
            extra=_ids(record),
        )
        return results

    async def snapshot_template(self, record: SandboxRecord, name: str | None = None) -> SavedSandbox:
        """Save the running sandbox as a snapshot template of its owner (``create`` restores it by
        id, or by ``name``: the newest of the key's templates of that name)."""
        async with record.transition:
            self._check_live(record)
            check_quiet(record)
            refuse_saving_networked(record.allowed_domains, "snapshotted")
            with self._save_slot(record.owner):
                _, saved = await self._save(record, "templates", "snap-" + secrets.token_hex(8), name=name)
        self._templates[saved.id] = saved
        logger.info("sandbox %s saved as template %s", record.sandbox_id, saved.id, extra=_ids(record))
        return saved

    async def delete_template(self, owner: str, template_id: str) -> None:
        saved = self.template(owner, template_id)
        if self._template_users.get(template_id):
            raise ServeError(f"template {template_id!r} is being restored; try again", status=409)
        del self._templates[saved.id]
        await asyncio.to_thread(self.store.discard, self.store.path("templates", saved.id))

    # ------------------------------------------------------------------ kill

    async def kill(self, owner: str, sandbox_id: str) -> None:
        await self._kill(self.get(owner, sandbox_id), "killed")

    async def _kill(self, record: SandboxRecord, reason: str, *, keep_paused: bool = False) -> None:
        async with record.transition:  # a pause / resume / fork in flight finishes first
            if self._records.get(record.sandbox_id) is not record:
                return  # another kill got here first
            try:
                if keep_paused and record.state == "paused":
                    return  # stays on disk for the next server
                if record.state == "paused" and self._paused.pop(record.sandbox_id, None) is not None:
                    path = self.store.path("sandboxes", record.sandbox_id)  # listed until it is gone
                    await shielded(asyncio.to_thread(self.store.discard, path))
                record.state = "killed"  # from now on: 404, absent from lists
                logger.info("sandbox %s ends: %s", record.sandbox_id, reason, extra=_ids(record))
                await _close_all(record.sessions())
            finally:
                # Forgotten only once its VMs and files are gone: nothing outlives its 404.
                self._records.pop(record.sandbox_id, None)


def _ids(record: SandboxRecord) -> dict[str, str | None]:
    """Log fields naming the sandbox and its owner (a digest prefix: never the key)."""
    return {"sandbox_id": record.sandbox_id, "owner": owner_tag(record.owner)}


async def _close_all(sessions: list[Session]) -> None:
    for session in sessions:
        try:
            await session.close()
        except Exception:  # the VM is going away either way; log and go on with the others
            logger.exception("closing session %s failed", session.vm_id)
