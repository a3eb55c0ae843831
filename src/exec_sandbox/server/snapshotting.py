"""A whole ``sbx serve`` sandbox (its shell session and every context VM) to a snapshot dir and back,
and what must hold around that (no command running into a clone; the record written beside it).

One dir holds ``main/`` and ``ctx-<id>/`` (see :mod:`exec_sandbox.server.persistence`); pause, fork
and templates all go through :func:`save_sandbox` and :func:`restore_sandbox`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from exec_sandbox.client.process import ProcessHandle, ProcessState
from exec_sandbox.server.errors import ServeError
from exec_sandbox.server.persistence import MAIN_SNAPSHOT, SavedContext, SavedSandbox, context_snapshot_name
from exec_sandbox.server.records import SESSION_IDLE_S, CodeContext, SandboxRecord

if TYPE_CHECKING:
    from exec_sandbox.sandbox.scheduler import Scheduler
    from exec_sandbox.sandbox.session import Session

__all__ = ["check_quiet", "restore_sandbox", "save_sandbox", "saved_record", "stop_commands"]

_COMMAND_GRACE_S: Final = 0.5


async def save_sandbox(record: SandboxRecord, directory: Path) -> list[SavedContext]:
    """Save every VM of a running sandbox into ``directory`` (each once its running call is done);
    the sandbox goes on. Returns its contexts as saved."""
    await record.session.save(directory / MAIN_SNAPSHOT)
    saved: list[SavedContext] = []
    for ctx in list(record.contexts.values()):
        async with ctx.lock:  # the interpreter's prelude bookkeeping is consistent under it
            session = ctx.session
            has_vm = session is not None and not session.closed
            if session is not None and has_vm:
                await session.save(directory / context_snapshot_name(ctx.id))
            saved.append(
                SavedContext(
                    id=ctx.id,
                    language=ctx.language,
                    cwd=ctx.cwd,
                    prepared=ctx.prepared and has_vm,
                    # A restored session counts its execs from 0: keep execution_count going on.
                    hidden_execs=ctx.hidden_execs - session.exec_count if session and has_vm else 0,
                    snapshot=has_vm,
                )
            )
    return saved


async def restore_sandbox(
    scheduler: Scheduler, directory: Path, contexts: list[SavedContext], env_vars: dict[str, str]
) -> tuple[Session, dict[str, CodeContext]]:
    """New live sessions from a dir :func:`save_sandbox` wrote (which stays); all or none."""
    made: list[Session] = []
    try:
        main = await scheduler.restore_session(
            directory / MAIN_SNAPSHOT, env_vars=env_vars, idle_timeout_seconds=SESSION_IDLE_S
        )
        made.append(main)
        restored: dict[str, CodeContext] = {}
        for c in contexts:
            ctx = CodeContext(id=c.id, language=c.language, cwd=c.cwd)
            if c.snapshot:
                ctx.session = await scheduler.restore_session(
                    directory / context_snapshot_name(c.id),
                    env_vars=env_vars,
                    idle_timeout_seconds=SESSION_IDLE_S,
                )
                made.append(ctx.session)
                ctx.prepared, ctx.hidden_execs = c.prepared, c.hidden_execs
            restored[c.id] = ctx
    except BaseException:
        await asyncio.shield(asyncio.gather(*(s.close() for s in made), return_exceptions=True))
        raise
    return main, restored


def check_quiet(record: SandboxRecord) -> None:
    """Fork and snapshot need a running sandbox with no command running: a clone would inherit the
    command's processes and answer its exec requests to a host that never made them."""
    if record.state != "running":
        raise ServeError(f"sandbox {record.sandbox_id!r} is paused; resume it first", status=409)
    running = len(_running(record))
    if running:
        raise ServeError(
            f"sandbox {record.sandbox_id!r} has {running} command(s) running: "
            "wait for them or kill them first",
            status=409,
        )


async def stop_commands(record: SandboxRecord) -> None:
    """Kill the sandbox's running commands (their clients get their end) and wait for them."""
    handles = _running(record)
    if handles:
        await asyncio.gather(*(h.kill() for h in handles), return_exceptions=True)
        # The guest kills their process trees and sends each one's last frame after the host gave
        # up on it: let those land on this connection (dropped as late) rather than on the restored
        # VM's (whose agent also ends processes of an earlier connection).
        await asyncio.sleep(_COMMAND_GRACE_S)


def _running(record: SandboxRecord) -> list[ProcessHandle]:
    return [p.handle for p in record.processes.values() if p.handle.state is ProcessState.RUNNING]


def saved_record(record: SandboxRecord, entry_id: str, contexts: list[SavedContext]) -> SavedSandbox:
    """What is written beside the snapshots of ``record`` (no token: a new one is made on restore)."""
    return SavedSandbox(
        id=entry_id,
        source=record.sandbox_id,
        owner=record.owner,
        template_id=record.template_id,
        metadata=record.metadata,
        env_vars=record.env_vars,
        memory_mb=record.memory_mb,
        started_at=record.started_at,
        end_at=record.end_at,
        saved_at=time.time(),
        contexts=contexts,
        default_contexts=record.default_contexts,
        next_pid=record.next_pid,
        auto_pause=record.auto_pause,
    )
