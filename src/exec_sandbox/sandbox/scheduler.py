"""``Scheduler``: the public entry point of :mod:`exec_sandbox` — one-shot runs and sessions.

::

    from exec_sandbox import Scheduler, SchedulerConfig

    async with Scheduler(SchedulerConfig(default_memory_mb=256)) as scheduler:
        result = await scheduler.run("print('hi')", language="python")
        async with await scheduler.session(language="python") as s:
            await s.exec("x = 41")
            print((await s.exec("print(x + 1)")).stdout)      # 42

``run()``
    Every run gets its own VM - booted from a fresh qcow2 overlay over the language's base image, or
    restored from a memory snapshot, or taken ready from the warm pool (see Speed) - used once: the
    VM, its overlay and its sockets are destroyed after the run, so nothing a run does survives it.
    On success the VM is stopped in the background right after the result is handed back (its
    admission capacity returns when it is gone; ``close()`` waits for it); on an error or a
    cancellation it is stopped before the exception propagates. Steps: validate input (before any VM
    is spent) -> find/build the image -> get a VM (pool, or reserve capacity with
    :class:`AdmissionController` - FIFO, timeout - then restore or boot) -> upload ``files`` ->
    execute -> read back ``download``. ``TimingBreakdown`` has ``admission_wait_ms``, ``setup_ms``
    (image lookup/build), ``overlay_ms``, ``boot_ms`` (VM start to agent answering, restores
    included; 0 for a warm-pool hit), ``restore_ms`` (restores only), ``execute_ms`` and
    ``total_ms``; ``teardown_ms`` is 0 because teardown is no longer on the caller's path.

Limits
    - ``timeout_seconds`` (default ``config.default_timeout_seconds``, at most
      ``config.max_timeout_seconds``): the guest agent kills the process tree; the result has
      ``timed_out=True``, ``exit_code == -1`` and a ``[sandbox] execution timed out`` stderr note.
    - ``memory_mb``: the guest's RAM (QEMU ``-m``). The guest kernel's OOM killer ends a memory bomb;
      the result has ``oom_killed=True``, ``signal == 9`` and a stderr note. The host is not touched
      beyond the reserved ``memory_mb + vm_overhead_mb``.
    - stdout / stderr are capped at ``config.max_output_bytes`` each; beyond it output is dropped in
      the guest, ``stdout_truncated``/``stderr_truncated`` is set and a ``[sandbox] ... truncated``
      marker line ends the stream. The host counts the output as it arrives too: a guest that sends
      more than the cap gets :class:`~exec_sandbox.errors.GuestProtocolError` and its VM killed.
    - ``download``: each file at most ``config.max_file_bytes``, counted by the host as the bytes
      arrive (a file the guest grows after the size check is cut at the cap and reported in
      ``download_errors``).
    - host memory per sandbox, whatever the guest sends: at most ~16 MiB of protocol buffers plus
      the results asked for (output up to ``max_output_bytes`` per stream, downloads up to
      ``max_file_bytes`` each) - under 64 MiB above baseline with the default output cap.
    - code size (``config.max_code_bytes``), env vars (names, reserved names, NUL, sizes) and guest
      paths are validated on the host before a VM is spent.
    - user code runs as uid 1000 in the guest; its process count is capped there (RLIMIT_NPROC).
    - the QEMU process itself goes into a per-VM cgroup v2 (``cpu.max`` = vCPUs, ``pids.max``,
      ``memory.max`` = guest RAM + overhead) where the host delegates those controllers; elsewhere
      (e.g. a hybrid cgroup v1 host) this is skipped with one log line — the guest stays bounded by
      its own RAM and vCPU count.

Streaming
    ``on_stdout`` / ``on_stderr`` get output chunks as the guest produces them, in order per stream;
    ``on_boot_log`` gets guest console lines while the VM boots. Callbacks may be plain functions or
    coroutine functions; one that raises is logged and ignored — the run goes on.

Exceptions (all :class:`~exec_sandbox.errors.SandboxError`; ``CancelledError`` is never wrapped)::

    SandboxError
    ├── SandboxInputError              bad code / language / env / limits / paths, or a closed
    │   │                              session (caller bug; never retry as is)
    │   └── SessionClosedError         call on a closed session (context["reason"])
    ├── SandboxTransientError          the code never ran; safe to retry
    │   ├── VmCapacityError            no capacity within config.admission_timeout_seconds
    │   └── SchedulerClosedError       the Scheduler closed before the code ran
    ├── SandboxPermanentError          cannot work on this host as configured (image build, ...)
    ├── GuestAgentError                the guest agent refused a request (e.g. a missing file)
    │   └── GuestProtocolError         the guest misbehaved (bad frame, flood past a host cap,
    │                                  frames for requests never made): its VM was killed
    └── CommunicationOutcomeUnknownError  the VM/agent link died after the code was sent (it may
                                       have run), incl. the Scheduler closing mid-run

Transient boot failures (QEMU died, the agent never answered) are retried once with a fresh VM —
the code had not been sent, so this cannot run it twice; a second failure raises
:class:`SandboxTransientError` with the boot context (console tail, QEMU stderr).

Concurrency
    Many ``run()`` / ``session()`` calls may run at once on one Scheduler; each holds an admission
    grant for its VM's lifetime (see :mod:`exec_sandbox.sandbox.admission`): guest memory is committed up to
    ``memory_overcommit_ratio`` x the usable RAM (1.0: never over-committed), CPU is held only while a
    VM starts or runs a one-shot ``run()`` (an idle session holds memory only), and every start is
    also checked against the host's real free memory, so admission queues before the host runs out.
    All Scheduler state lives on one event loop; there are no threads sharing it.

Close
    ``close()`` (or leaving ``async with``) is idempotent: it refuses new calls, ends in-flight runs
    (they raise :class:`SchedulerClosedError`, or :class:`CommunicationOutcomeUnknownError` when their
    code had been sent), closes open sessions, stops every VM, the overlay pool and its
    qemu-storage-daemon, and removes the runtime directory it created. Cancelling a ``run()``
    stops its VM and removes its overlay before the cancellation propagates.

Speed (issue 5)
    Where a VM comes from (warm pool, L1 snapshot, cold boot) and where it goes back: see
    :mod:`exec_sandbox.sandbox.provisioning`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exec_sandbox.client.agent import OutputCallback
from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestProtocolError,
    SandboxError,
)
from exec_sandbox.host.cgroups import CgroupManager
from exec_sandbox.host.runtime_dirs import make_scheduler_runtime_dir, remove_scheduler_runtime_dir
from exec_sandbox.models import Language, PortForward, TimingBreakdown
from exec_sandbox.packages import PackageLock, PackageRequest, parse_packages
from exec_sandbox.sandbox.admission import AdmissionController
from exec_sandbox.sandbox.foreground import ForegroundActivity
from exec_sandbox.sandbox.network import NetworkPlan, plan_network
from exec_sandbox.sandbox.packages import PackageLayers
from exec_sandbox.sandbox.provisioning import BACKGROUND_NICE, SchedulerState, VmLease
from exec_sandbox.sandbox.run_result import RunResult
from exec_sandbox.sandbox.session import Session
from exec_sandbox.sandbox.session_factory import RunState, SessionFactory
from exec_sandbox.sandbox.warm_pool import WarmPool
from exec_sandbox.settings import Settings
from exec_sandbox.storage.overlay_pool import OverlayPool
from exec_sandbox.timing import elapsed_ms
from exec_sandbox.validation import (
    validate_code,
    validate_downloads,
    validate_env_vars,
    validate_language,
    validate_memory_mb,
    validate_timeout,
    validate_uploads,
)
from exec_sandbox.vm.execution import download_problem, execute_in_vm
from exec_sandbox.vm.sandbox_vm import BootLogCallback
from exec_sandbox.vm.snapshots import SnapshotCache
from exec_sandbox.vm_manager import VmManager
from smartvm.cleanup import AsyncService, shielded
from smartvm.process import can_raise_priority

if TYPE_CHECKING:
    from exec_sandbox.egress import Secret

__all__ = [
    "BACKGROUND_NICE",
    "RunResult",
    "Scheduler",
    "SchedulerState",
    "VmLease",
]

logger = logging.getLogger(__name__)


class Scheduler(SessionFactory, AsyncService):
    """Runs untrusted code in fresh microVMs; see the module docstring. Use ``async with``."""

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        *,
        settings: Settings | None = None,
        runtime_dir: Path | None = None,
        vm_manager: VmManager | None = None,
        snapshot_dir: Path | None = None,
        layer_dir: Path | None = None,
    ) -> None:
        """``settings``: default ``config.settings()``. ``runtime_dir``: where overlays, sockets and VM
        directories go (default: a fresh per-Scheduler dir under smartvm's runtime dir, removed on
        close; a given one may be shared, and what dead owners left there is reaped at start).
        ``vm_manager``: e.g. ``VmManager(settings, progress=...)`` to show first-run image
        builds; default ``VmManager(settings)``. ``snapshot_dir``: the L1 snapshot cache directory
        (default ``settings.cache_dir / "snapshots"``, shared with other processes). ``layer_dir``: the
        L2 package layer cache (default ``settings.cache_dir / "layers"``)."""
        self.config = config or SchedulerConfig()
        self.settings = settings or (
            vm_manager.settings if vm_manager is not None else self.config.settings()
        )
        self._given_runtime_dir = runtime_dir
        self._runtime_dir: Path | None = None
        self._created_runtime_dir = False
        self._state = SchedulerState.NEW
        self._lifecycle_lock = asyncio.Lock()
        self._admission: AdmissionController | None = None
        self._pool: OverlayPool | None = None
        self._vm_manager = vm_manager or VmManager(self.settings)
        # Image builds share the kernel and the cache: one at a time, and once per language.
        self._image_lock = asyncio.Lock()
        self._images: dict[Language, Path] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Background VMs run niced only where they can be un-niced (root or CAP_SYS_NICE).
        self._can_renice = can_raise_priority()
        self._base_nice = os.getpriority(os.PRIO_PROCESS, 0)
        # Runs and session execs in flight: warm-pool refills wait for a gap between them.
        self._foreground = ForegroundActivity()
        self._sessions: set[Session] = set()
        self._cgroups: CgroupManager | None = None
        self._snapshot_dir = snapshot_dir
        self._snapshots: SnapshotCache | None = None
        self._warm_pools: dict[Language, WarmPool] = {}
        self._retiring: set[asyncio.Task[None]] = set()  # VMs of finished runs being stopped
        self.packages = PackageLayers(self.settings, self._vm_manager, cache_dir=layer_dir)  # packages=

    # ------------------------------------------------------------------ introspection

    @property
    def state(self) -> SchedulerState:
        return self._state

    @property
    def runtime_dir(self) -> Path | None:
        return self._runtime_dir

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    @property
    def snapshot_cache(self) -> SnapshotCache | None:
        """The L1 snapshot cache (None when ``enable_memory_snapshots`` is off or not started)."""
        return self._snapshots

    def warm_pool(self, language: Language | str) -> WarmPool | None:
        """The warm pool of ``language`` (None: no pool, or the language was not used yet)."""
        return self._warm_pools.get(validate_language(language))

    def __repr__(self) -> str:
        runs, sessions = len(self._tasks), len(self._sessions)
        return f"Scheduler(state={self._state.value!r}, runs={runs}, sessions={sessions})"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Size admission from the host, start the overlay pool (and its storage daemon). Idempotent."""
        async with self._lifecycle_lock:
            if self._state is SchedulerState.RUNNING:
                return
            if self._state is not SchedulerState.NEW:
                raise self._closed_error("start")
            plan_network(self.config)  # a bad egress config fails here, naming the field
            admission = AdmissionController.from_config(self.config)
            runtime_dir = await asyncio.to_thread(self._make_runtime_dir)
            pool = OverlayPool(
                max(1, admission.max_vms(self.config.default_memory_mb, self.config.default_vcpus)),
                runtime_dir / f"pool-{secrets.token_hex(3)}",
                qemu_img=self.settings.qemu_img_binary,
            )
            try:
                await pool.start()
                self._cgroups = await self._open_cgroups()
            except BaseException:
                await pool.stop()
                await asyncio.to_thread(self._remove_runtime_dir)
                raise
            if self.config.enable_memory_snapshots:
                self._snapshots = SnapshotCache(
                    self._snapshot_dir, settings=self.settings, vm_manager=self._vm_manager
                )
            self._admission, self._pool = admission, pool
            self.packages.runtime_dir = runtime_dir
            self._state = SchedulerState.RUNNING
            logger.info(
                "scheduler started: budget %d MiB / %.1f vCPUs, runtime dir %s",
                admission.memory_budget_mb,
                admission.cpu_budget,
                runtime_dir,
            )

    def _make_runtime_dir(self) -> Path:
        path, self._created_runtime_dir = make_scheduler_runtime_dir(self._given_runtime_dir)
        self._runtime_dir = path
        return path

    def _remove_runtime_dir(self) -> None:
        if self._created_runtime_dir and self._runtime_dir is not None:
            remove_scheduler_runtime_dir(self._runtime_dir)
            self._created_runtime_dir = False

    async def aclose(self) -> None:
        """Stop everything (see the module docstring). Idempotent; safe in any state."""
        async with self._lifecycle_lock:
            if self._state in (SchedulerState.NEW, SchedulerState.CLOSED):
                self._state = SchedulerState.CLOSED
                return
            self._state = SchedulerState.CLOSING
            try:
                await shielded(self._shutdown())  # a cancelled caller cannot cut the teardown short
            finally:
                self._state = SchedulerState.CLOSED

    close = aclose  # the older name, kept

    async def _shutdown(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        sessions = list(self._sessions)
        pools = list(self._warm_pools.values())
        # Pools first in the list: their refills stop taking capacity while the rest winds down.
        results = await asyncio.gather(
            *(p.drain() for p in pools),
            *(s._close("scheduler_closed") for s in sessions),
            *tasks,
            return_exceptions=True,
        )
        for outcome in results:
            if isinstance(outcome, Exception) and not isinstance(outcome, SandboxError):
                logger.warning("error while closing the scheduler: %r", outcome)
        while self._retiring:  # never cancelled: each one finishes stopping its VM
            await asyncio.wait(set(self._retiring))
        if self._snapshots is not None:
            try:
                await self._snapshots.aclose()  # snapshots being published finish (or clean up)
            except Exception as exc:
                logger.warning("error while closing the snapshot cache: %r", exc)
        if self._admission is not None:
            self._admission.close()
        if self._pool is not None:
            await self._pool.stop()
        if self._cgroups is not None:
            await self._cgroups.aclose()
        await asyncio.to_thread(self._remove_runtime_dir)

    # ------------------------------------------------------------------ run

    async def run(
        self,
        code: str,
        *,
        language: Language | str = "python",
        timeout_seconds: float | None = None,
        memory_mb: int | None = None,
        env_vars: Mapping[str, str] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        on_boot_log: BootLogCallback | None = None,
        files: Mapping[str, bytes | Path] | None = None,
        download: Sequence[str] | None = None,
        allowed_domains: Sequence[str] | None = None,
        secrets: Mapping[str, Secret | Mapping[str, Any]] | None = None,
        packages: Sequence[str] | PackageLock | None = None,
    ) -> RunResult:
        """Run ``code`` once in a fresh VM and return its result (see the module docstring).

        ``allowed_domains``/``secrets`` replace the config's for this run (see ``SchedulerConfig``).
        ``packages``: requirement strings (npm specs for JavaScript) or a lock, installed from the
        host into a cached L2 layer before the VM boots (:mod:`exec_sandbox.sandbox.packages`)."""
        lang = validate_language(language)
        request = parse_packages(lang, packages)
        code = validate_code(code, max_bytes=self.config.max_code_bytes)
        timeout = validate_timeout(
            self.config.default_timeout_seconds if timeout_seconds is None else timeout_seconds,
            max_seconds=self.config.max_timeout_seconds,
        )
        memory = validate_memory_mb(self.config.default_memory_mb if memory_mb is None else memory_mb)
        env = validate_env_vars(env_vars)
        uploads = validate_uploads(files, max_file_bytes=self.config.max_file_bytes)
        downloads = validate_downloads(download)
        net = plan_network(self.config, allowed_domains=allowed_domains, secrets=secrets)
        self._require_running("run code in")
        state = RunState()
        inner = asyncio.get_running_loop().create_task(
            self._run(
                code, lang, timeout, memory, env, on_stdout, on_stderr, on_boot_log, uploads, downloads,
                state, net, request,
            ),
            name="sbx-run",
        )
        with self._foreground.track():  # warm-pool refills wait for a gap (see ForegroundActivity)
            result: RunResult = await self._await_tracked(inner, state)
        return result

    async def _run(
        self,
        code: str,
        language: Language,
        timeout: float,
        memory_mb: int,
        env: dict[str, str],
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        on_boot_log: BootLogCallback | None,
        uploads: dict[str, bytes | Path],
        downloads: list[tuple[str, str]],
        state: RunState,
        net: NetworkPlan | None = None,
        request: PackageRequest | None = None,
    ) -> RunResult:
        started = time.perf_counter()
        t = time.perf_counter()
        await self._ensure_image(language)
        install = None if request is None else await self.packages.ensure(language, request)
        setup_ms = elapsed_ms(t)
        lease = await self._provision(language, memory_mb, on_boot_log, net=net, install=install)
        vm = lease.vm
        finished = False
        files: dict[str, bytes] = {}
        download_errors: dict[str, str] = {}
        try:
            for rel, data in uploads.items():
                await vm.agent.write_file(rel, data)
            state.dispatched = True
            outcome = await execute_in_vm(
                vm,
                code,
                language=language,
                session=False,
                timeout_s=timeout,
                env=env,
                max_output_bytes=self.config.max_output_bytes,
                memory_mb=memory_mb,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
            for given, rel in downloads:
                if outcome.guest_unresponsive:  # the VM is being destroyed: nothing to ask it
                    download_errors[given] = "the guest did not answer by the deadline"
                    continue
                try:
                    problem = await download_problem(vm, rel, self.config.max_file_bytes)
                    if problem is None:
                        # The listing above is only a quick refusal: the guest may grow the file
                        # after it, so the cap is enforced again on the bytes as they arrive.
                        files[given] = await vm.agent.read_file(rel, max_bytes=self.config.max_file_bytes)
                    else:
                        download_errors[given] = problem
                except SandboxError as exc:
                    if isinstance(exc, CommunicationOutcomeUnknownError | GuestProtocolError):
                        raise
                    download_errors[given] = exc.message
            finished = True
        finally:
            if not finished:  # failed or cancelled: the VM is gone before the error propagates
                await self._retire(lease)
        if lease.gateway is not None:  # the log of a connection closed at the very end, too
            await lease.gateway.settled(timeout=1.0)
        self._retire_later(lease)  # the result is complete: stop the VM after returning it
        boot = vm.timing
        fresh = not lease.warm_pool_hit  # a pooled VM was made before this run: no cost to it
        timing = TimingBreakdown(
            admission_wait_ms=lease.grant.waited_ms,
            setup_ms=setup_ms + (boot.image_ms if fresh else 0.0),
            overlay_ms=boot.overlay_ms if fresh else 0.0,
            boot_ms=boot.qemu_spawn_ms + boot.boot_to_agent_ms + boot.reseed_ms if fresh else 0.0,
            restore_ms=(
                boot.qemu_spawn_ms + boot.boot_to_agent_ms + boot.reseed_ms
                if fresh and boot.restored
                else None
            ),
            execute_ms=outcome.execute_ms,
            total_ms=elapsed_ms(started),
        )
        return RunResult(
            **outcome.result_fields(vm),
            timing=timing,
            language=language,
            warm_pool_hit=lease.warm_pool_hit,
            restored_from_snapshot=lease.restored_from_snapshot,
            files=files,
            download_errors=download_errors,
            egress_log=lease.gateway.egress_log() if lease.gateway else [],
            egress_stats=lease.gateway.stats.model_copy() if lease.gateway else None,
            packages=install.lock if install else None,
            packages_cache_hit=install.cache_hit if install else None,
        )

    # ------------------------------------------------------------------ sessions

    async def session(
        self,
        language: Language | str = "python",
        *,
        memory_mb: int | None = None,
        env_vars: Mapping[str, str] | None = None,
        idle_timeout_seconds: float | None = None,
        disk_size_mb: int | None = None,
        allowed_domains: Sequence[str] | None = None,
        port_forwards: Sequence[PortForward | Mapping[str, object] | int | str] | None = None,
        secrets: Mapping[str, Secret | Mapping[str, Any]] | None = None,
        packages: Sequence[str] | PackageLock | None = None,
    ) -> Session:
        """Boot a VM for a stateful :class:`Session` (``async with await scheduler.session() as s``).

        ``disk_size_mb``: this session's disk (work dir) size; default ``config.disk_size_mb``.
        ``allowed_domains``/``port_forwards``/``secrets`` replace the config's for this session;
        ``session.forwarded_ports`` says which host port serves which guest port.
        ``packages``: as for :meth:`run`; ``Session.packages`` is the lock installed."""
        lang = validate_language(language)
        request = parse_packages(lang, packages)
        disk = None if disk_size_mb is None else validate_memory_mb(
            disk_size_mb, min_mb=256, max_mb=1024 * 1024, field="disk_size_mb"
        )
        memory = validate_memory_mb(self.config.default_memory_mb if memory_mb is None else memory_mb)
        env = validate_env_vars(env_vars)
        if idle_timeout_seconds is None:
            idle_timeout_seconds = self.config.session_idle_timeout_seconds
        idle = validate_timeout(
            idle_timeout_seconds,
            max_seconds=86400.0,
            field="idle_timeout_seconds",
        )
        net = plan_network(self.config, allowed_domains=allowed_domains, port_forwards=port_forwards,
                           secrets=secrets)
        self._require_running("open a session in")
        inner = asyncio.get_running_loop().create_task(
            self._open_session(lang, memory, env, idle, disk, net, request), name="sbx-session-open"
        )
        session: Session = await self._await_tracked(inner, None)
        return session

    async def restore_session(
        self,
        directory: Path,
        *,
        env_vars: Mapping[str, str] | None = None,
        idle_timeout_seconds: float | None = None,
    ) -> Session:
        """A new session from a snapshot made by :meth:`Session.save` (language, memory, interpreter
        state and files as saved; RNG reseeded). ``directory`` stays; it may be restored again."""
        idle = validate_timeout(
            idle_timeout_seconds or self.config.session_idle_timeout_seconds, max_seconds=86400.0,
            field="idle_timeout_seconds",
        )
        env = validate_env_vars(env_vars)
        self._require_running("restore a session in")
        inner = asyncio.get_running_loop().create_task(self._restore(Path(directory), env, idle))
        session: Session = await self._await_tracked(inner, None)
        return session
