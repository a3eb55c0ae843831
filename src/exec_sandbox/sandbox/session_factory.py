"""Where a :class:`Session` comes from: opened on a provisioned VM, restored from a saved
snapshot, or forked from a live one; and the tracked-task wrapper the Scheduler's public calls use
(a close of the Scheduler turns into a clear error rather than a bare cancellation)."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exec_sandbox.errors import CommunicationOutcomeUnknownError
from exec_sandbox.models import Language
from exec_sandbox.packages import PackageRequest
from exec_sandbox.sandbox.lifecycle_errors import SchedulerClosedError
from exec_sandbox.sandbox.network import NetworkPlan
from exec_sandbox.sandbox.packages import PackageInstall
from exec_sandbox.sandbox.provisioning import SchedulerState, VmLease, VmProvisioner
from exec_sandbox.sandbox.session import Session

__all__ = ["RunState", "SessionFactory"]


@dataclass
class RunState:
    """Per-run facts the close/cancel paths need."""

    dispatched: bool = False


class SessionFactory(VmProvisioner):
    """The session half of the Scheduler (see the module docstring)."""

    _tasks: set[asyncio.Task[Any]]
    _sessions: set[Session]

    async def _await_tracked(self, inner: asyncio.Task[Any], state: RunState | None) -> Any:
        """Await an internal task; translate a cancellation caused by ``close()`` into a clear error."""
        self._tasks.add(inner)
        inner.add_done_callback(self._tasks.discard)
        try:
            # If the caller is cancelled, awaiting the task cancels it and waits for its cleanup.
            return await inner
        except asyncio.CancelledError:
            me = asyncio.current_task()
            caller_cancelled = me is not None and me.cancelling() > 0
            if caller_cancelled or self._state is SchedulerState.RUNNING or not inner.cancelled():
                raise
            if state is not None and state.dispatched:
                raise CommunicationOutcomeUnknownError(
                    "the Scheduler was closed while the code was running; its VM was stopped",
                    context={"reason": "scheduler_closed"},
                ) from None
            raise SchedulerClosedError(
                "the Scheduler was closed before the code ran", context={"reason": "scheduler_closed"}
            ) from None

    async def _open_session(
        self, language: Language, memory_mb: int, env: dict[str, str], idle: float,
        disk_size_mb: int | None = None, net: NetworkPlan | None = None,
        request: PackageRequest | None = None,
    ) -> Session:
        await self._ensure_image(language)
        install = None if request is None else await self.packages.ensure(language, request)
        lease = await self._provision(language, memory_mb, None, disk_size_mb, net, install)
        return await self._new_session(lease, language, memory_mb, env, idle, install)

    async def _new_session(
        self, lease: VmLease, language: Language, memory_mb: int, env: dict[str, str], idle: float,
        install: PackageInstall | None = None,
    ) -> Session:
        """Wrap a leased VM in a registered :class:`Session` (the lease is retired on failure)."""
        try:
            session = Session(
                vm=lease.vm,
                retire=functools.partial(self._retire, lease),
                config=self.config,
                language=language,
                memory_mb=memory_mb,
                env_vars=env,
                idle_timeout_seconds=idle,
                on_closed=self._sessions.discard,
                fork=self._fork_session,
                warm_pool_hit=lease.warm_pool_hit,
                restored_from_snapshot=lease.restored_from_snapshot,
                foreground=self._foreground,
                egress=lease.gateway,
                forwarded_ports=lease.forwards,
                network=lease.net,
            )
        except BaseException:
            await self._retire(lease)
            raise
        self._sessions.add(session)
        if install is not None:
            session.packages, session.packages_cache_hit = install.lock, install.cache_hit
        lease.grant.settle()  # an idle session holds memory only: its CPU share goes back to admission
        # ...as long as it really is idle: its QEMU's CPU time is measured, and a session found
        # burning CPU (work its code left running) counts against the CPU budget again.
        lease.grant.meter_cpu(lease.vm.cpu_seconds)
        return session

    async def _restore(self, directory: Path, env: dict[str, str], idle: float) -> Session:
        lease = await self._provision_restore(directory)
        return await self._new_session(lease, lease.vm.language, lease.vm.options.memory_mb, env, idle)

    async def _fork_session(self, parent: Session) -> Session:
        """``parent.fork()``: reserve capacity, clone the VM while the session is quiet, wrap it."""
        self._require_running("fork a session in")
        inner = asyncio.get_running_loop().create_task(self._fork(parent), name="sbx-session-fork")
        session: Session = await self._await_tracked(inner, None)
        return session

    async def _fork(self, parent: Session) -> Session:
        async with parent.exclusive() as vm:
            lease = await self._provision_fork(vm, parent.memory_mb, parent.network)
        child = await self._new_session(
            lease, parent.language, parent.memory_mb, dict(parent.env_vars), parent.idle_timeout_seconds
        )
        child.packages, child.packages_cache_hit = parent.packages, parent.packages_cache_hit  # same disk
        return child
