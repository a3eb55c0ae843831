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
    :meth:`Scheduler._provision` is the one place a ready VM comes from, :meth:`Scheduler._retire`
    the one place it goes back. A VM comes, in this order, from:

    1. the warm pool (``config.warm_pool_size`` > 0): ready, REPL-warm VMs per language, kept by a
       :class:`~exec_sandbox.sandbox.warm_pool.WarmPool` per language started on first use of the language
       (or by :meth:`Scheduler.prewarm`). Checkout is O(1) (plus one agent ping as health check);
       only runs/sessions with the default memory size are served. Refills run in the background one
       VM at a time and take capacity only through ``AdmissionController.try_acquire`` (never while
       a foreground call is queued); idle pool VMs are given back when foreground calls queue.
       ``ExecutionResult.warm_pool_hit`` says so; ``timing.boot_ms`` is 0 for a hit.
    2. the L1 memory-snapshot cache (``config.enable_memory_snapshots``, default on):
       :meth:`SnapshotCache.restore_or_boot` restores a warm guest of the same (language, image,
       kernel, memory, vCPUs, QEMU, accelerator, ...) combination in a fresh QEMU, reseeding its RNG
       before any user code runs; the first cold boot of a combination saves that snapshot.
       ``ExecutionResult.restored_from_snapshot`` says so. The cache lives in
       ``settings.cache_dir / "snapshots"`` (or ``snapshot_dir``), shared by processes via flock.
    3. a cold boot (snapshots disabled, or a networked VM, which cannot be snapshotted).

    A restored or pooled VM does not boot, so ``on_boot_log`` gets one ``[sandbox] ...`` line saying
    where the VM came from instead of console lines.

    :meth:`Session.fork` clones a session's VM (memory and disk) into a new, independent session
    (:func:`~exec_sandbox.vm.fork.fork_vm` under ``Session.exclusive()``); the clone reserves its own
    admission capacity first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydantic import Field

from exec_sandbox.client.agent import OutputCallback
from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestProtocolError,
    SandboxError,
    SandboxPermanentError,
    SandboxTransientError,
    VmCapacityError,
)
from exec_sandbox.host.capacity import find_cgroup2_mount
from exec_sandbox.host.cgroups import CgroupManager, VmCgroup
from exec_sandbox.models import ExecutionResult, Language, TimingBreakdown
from exec_sandbox.sandbox.admission import AdmissionController
from exec_sandbox.sandbox.foreground import ForegroundActivity
from exec_sandbox.sandbox.grants import Grant
from exec_sandbox.sandbox.lifecycle_errors import SchedulerClosedError
from exec_sandbox.sandbox.session import Session
from exec_sandbox.sandbox.warm_pool import WarmPool
from exec_sandbox.settings import Settings
from exec_sandbox.storage.overlay_pool import OverlayPool
from exec_sandbox.timing import elapsed_ms
from exec_sandbox.validation import (
    input_error,
    validate_code,
    validate_env_vars,
    validate_guest_path,
    validate_language,
    validate_memory_mb,
    validate_timeout,
)
from exec_sandbox.vm.execution import execute_in_vm
from exec_sandbox.vm.fork import fork_vm
from exec_sandbox.vm.sandbox_vm import BootLogCallback, SandboxVm
from exec_sandbox.vm.snapshots import SnapshotCache, warm_vm
from exec_sandbox.vm.spec import VmOptions
from exec_sandbox.vm_manager import VmManager
from smartvm.hostfs import UnsafePathError, ensure_private_dir
from smartvm.leftovers import OWNER_FILE, new_owner_record, private_runtime_dir, reap, write_owner_record
from smartvm.process import can_raise_priority

__all__ = [
    "BACKGROUND_NICE",
    "RunResult",
    "Scheduler",
    "SchedulerState",
    "VmLease",
    "reap_dead_scheduler_dirs",
]

logger = logging.getLogger(__name__)

_BOOT_ATTEMPTS = 2
# Nice value of VMs the warm pool makes in the background (set back to 0 at checkout).
BACKGROUND_NICE = 10
_BOOT_TIMEOUT_S = 90.0
# QEMU's threads (vCPUs, RCU, I/O workers); far below what a runaway would need, far above normal.
_QEMU_PIDS_MAX = 512


_SCHEDULER_DIR = re.compile(r"s(\d+)-[0-9a-f]{4}")


def reap_dead_scheduler_dirs(base: Path) -> list[Path]:
    """Remove the runtime dirs (``s<pid>-<hex>``) of Schedulers whose process is gone; return them.

    A Scheduler killed outright (SIGKILL, the OOM killer) takes its QEMUs and storage daemon with
    it (parent-death signal), but nothing of it removes its overlays, its VM directories or the
    guest-RAM files in /dev/shm (tmpfs: RAM that stays used). The next Scheduler on this host
    does, through smartvm's reaper (:mod:`smartvm.leftovers`): a Scheduler dir carries an owner
    record (pid + start time), so a live or reused pid keeps its dir; a dir without a record, not
    ours, or a symlink is never touched (``base`` may be a shared directory such as ``/tmp``).
    """
    return reap(base, name_pattern=_SCHEDULER_DIR, remove_unrecorded=False, shared_base=True).removed


class SchedulerState(StrEnum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class RunResult(ExecutionResult):
    """:class:`ExecutionResult` of ``Scheduler.run`` plus the files read back after the run.

    ``files`` maps each requested ``download`` path (as given) to its content; a path that could not
    be read (missing, a directory, larger than ``config.max_file_bytes``, ...) is absent from
    ``files`` and present in ``download_errors`` with the reason.
    """

    files: dict[str, bytes] = Field(default_factory=dict)
    download_errors: dict[str, str] = Field(default_factory=dict)


@dataclass
class VmLease:
    """A ready VM handed to one run or session, with where it came from and what it cost."""

    vm: SandboxVm
    grant: Grant
    boot_attempts: int = 1
    cgroup: VmCgroup | None = None
    warm_pool_hit: bool = False
    restored_from_snapshot: bool = False


@dataclass
class _RunState:
    """Per-run facts the close/cancel paths need."""

    dispatched: bool = False



class Scheduler:
    """Runs untrusted code in fresh microVMs; see the module docstring. Use ``async with``."""

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        *,
        settings: Settings | None = None,
        runtime_dir: Path | None = None,
        vm_manager: VmManager | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        """``settings``: default ``config.settings()``. ``runtime_dir``: where overlays, sockets and VM
        directories go (default: a fresh per-Scheduler dir under smartvm's runtime dir, removed on
        close). ``vm_manager``: e.g. ``VmManager(settings, progress=...)`` to show first-run image
        builds; default ``VmManager(settings)``. ``snapshot_dir``: the L1 snapshot cache directory
        (default ``settings.cache_dir / "snapshots"``, shared with other processes)."""
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

    # ------------------------------------------------------------------ introspection

    @property
    def state(self) -> SchedulerState:
        return self._state

    @property
    def admission(self) -> AdmissionController:
        if self._admission is None:
            raise self._closed_error("use the admission controller of")
        return self._admission

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

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Size admission from the host, start the overlay pool (and its storage daemon). Idempotent."""
        async with self._lifecycle_lock:
            if self._state is SchedulerState.RUNNING:
                return
            if self._state is not SchedulerState.NEW:
                raise self._closed_error("start")
            if self.config.allowed_domains or self.config.port_forwards:
                raise SandboxPermanentError(
                    "allowed_domains and port_forwards are not supported by this Scheduler yet; "
                    "use network_enabled alone or leave the network off",
                    context={"field": "allowed_domains" if self.config.allowed_domains else "port_forwards"},
                )
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
            self._state = SchedulerState.RUNNING
            logger.info(
                "scheduler started: budget %d MiB / %.1f vCPUs, runtime dir %s",
                admission.memory_budget_mb,
                admission.cpu_budget,
                runtime_dir,
            )

    async def _open_cgroups(self) -> CgroupManager | None:
        """Per-VM cgroup v2 limits (CPU, pids, memory) where the host delegates those controllers."""
        mount = await asyncio.to_thread(find_cgroup2_mount)
        if mount is None:
            logger.info("per-VM cgroup limits unavailable here: no cgroup v2 hierarchy")
            return None
        # A parent of our own: sharing one with other processes would race on its removal.
        manager = CgroupManager(mount / f"exec-sandbox-{os.getpid()}-{secrets.token_hex(3)}")
        support = await asyncio.to_thread(manager.open)
        if support.usable and support.controllers & {"cpu", "pids", "memory"}:
            logger.info("per-VM cgroup limits: %s", ", ".join(sorted(support.controllers)))
            return manager
        logger.info("per-VM cgroup limits unavailable here: %s", support.reason or "no controllers")
        await manager.aclose()
        return None

    def _attach_cgroup(self, vm: SandboxVm, memory_mb: int) -> VmCgroup | None:
        """Put the VM's QEMU process into its own cgroup. Best effort: the guest's RAM is bounded by
        QEMU's -m and its processes by the guest kernel either way; this bounds QEMU itself."""
        if self._cgroups is None or vm.machine.pid is None:
            return None
        cgroup: VmCgroup | None = None
        try:
            cgroup = self._cgroups.create(
                f"vm-{vm.vm_id}",
                # Guest RAM + QEMU's own overhead, with slack: the TCG cache and I/O buffers vary.
                memory_max_bytes=(memory_mb + 2 * self.config.vm_overhead_mb + 64) * 1024 * 1024,
                pids_max=_QEMU_PIDS_MAX,
                cpu_max=float(self.config.default_vcpus),
            )
            cgroup.add_pid(vm.machine.pid)
            return cgroup
        except SandboxError as exc:
            logger.warning("VM %s runs without its cgroup: %s", vm.vm_id, exc.message)
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    cgroup.path.rmdir()
            return None

    def _make_runtime_dir(self) -> Path:
        try:
            return self._make_private_runtime_dir()
        except UnsafePathError as exc:
            raise SandboxPermanentError(
                f"the runtime directory is not safe to use: {exc.message}",
                context={"path": str(exc.path), "problem": exc.problem},
            ) from exc

    def _make_private_runtime_dir(self) -> Path:
        if self._given_runtime_dir is not None:
            path = ensure_private_dir(self._given_runtime_dir)
        else:
            # Per scheduler, short (QEMU socket paths must stay under 108 bytes).
            base = private_runtime_dir().parent
            reap_dead_scheduler_dirs(base)
            for attempt in range(16):  # a name taken (planted, if base is shared) is skipped, never used
                path = base / f"s{os.getpid()}-{secrets.token_hex(2)}"
                try:
                    path.mkdir(mode=0o700)
                    break
                except FileExistsError:
                    if attempt == 15:
                        raise
            self._created_runtime_dir = True
            ensure_private_dir(path, create=False)
            write_owner_record(path, new_owner_record(path.name, kind="scheduler"))
        self._runtime_dir = path
        return path

    def _remove_runtime_dir(self) -> None:
        if self._created_runtime_dir and self._runtime_dir is not None:
            try:
                (self._runtime_dir / OWNER_FILE).unlink(missing_ok=True)
                self._runtime_dir.rmdir()
            except OSError as exc:
                logger.warning("runtime dir %s not removed: %s", self._runtime_dir, exc)
            self._created_runtime_dir = False

    async def close(self) -> None:
        """Stop everything (see the module docstring). Idempotent; safe in any state."""
        async with self._lifecycle_lock:
            if self._state in (SchedulerState.NEW, SchedulerState.CLOSED):
                self._state = SchedulerState.CLOSED
                return
            self._state = SchedulerState.CLOSING
            try:
                await self._shutdown()
            finally:
                self._state = SchedulerState.CLOSED

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

    def _closed_error(self, action: str) -> SchedulerClosedError:
        hint = " (use `async with Scheduler()` or await start())" if self._state is SchedulerState.NEW else ""
        return SchedulerClosedError(
            f"cannot {action} a Scheduler in state {self._state.value!r}{hint}",
            context={"state": self._state.value, "reason": "scheduler_closed"},
        )

    def _require_running(self, action: str) -> None:
        if self._state is not SchedulerState.RUNNING:
            raise self._closed_error(action)

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
    ) -> RunResult:
        """Run ``code`` once in a fresh VM and return its result (see the module docstring)."""
        lang = validate_language(language)
        code = validate_code(code, max_bytes=self.config.max_code_bytes)
        timeout = validate_timeout(
            self.config.default_timeout_seconds if timeout_seconds is None else timeout_seconds,
            max_seconds=self.config.max_timeout_seconds,
        )
        memory = validate_memory_mb(self.config.default_memory_mb if memory_mb is None else memory_mb)
        env = validate_env_vars(env_vars)
        uploads = self._validate_uploads(files)
        downloads = self._validate_downloads(download)
        self._require_running("run code in")
        state = _RunState()
        inner = asyncio.get_running_loop().create_task(
            self._run(
                code, lang, timeout, memory, env, on_stdout, on_stderr, on_boot_log, uploads, downloads, state
            ),
            name="sbx-run",
        )
        with self._foreground.track():  # warm-pool refills wait for a gap (see ForegroundActivity)
            result: RunResult = await self._await_tracked(inner, state)
        return result

    async def _await_tracked(self, inner: asyncio.Task[Any], state: _RunState | None) -> Any:
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

    def _validate_uploads(self, files: Mapping[str, bytes | Path] | None) -> dict[str, bytes | Path]:
        if files is None:
            return {}
        if not isinstance(files, Mapping):
            raise input_error("files", files, "must be a mapping of guest paths to bytes or local Paths")
        result: dict[str, bytes | Path] = {}
        for guest_path, data in files.items():
            rel = validate_guest_path(guest_path, field="files")
            if isinstance(data, bytes | bytearray | memoryview):
                size = len(data)
                data = bytes(data)
            elif isinstance(data, Path):
                try:
                    size = data.stat().st_size
                except OSError as exc:
                    raise input_error(f"files[{guest_path!r}]", str(data), f"cannot read: {exc}") from None
                if not data.is_file():
                    raise input_error(f"files[{guest_path!r}]", str(data), "is not a regular file")
            else:
                raise input_error(
                    f"files[{guest_path!r}]", data, f"must be bytes or a Path, not {type(data).__name__}"
                )
            if size > self.config.max_file_bytes:
                raise input_error(
                    f"files[{guest_path!r}]",
                    f"<{size} bytes>",
                    f"is larger than max_file_bytes ({self.config.max_file_bytes})",
                    size_bytes=size,
                    limit_bytes=self.config.max_file_bytes,
                )
            result[rel] = data
        return result

    def _validate_downloads(self, download: Sequence[str] | None) -> list[tuple[str, str]]:
        if download is None:
            return []
        if isinstance(download, str | bytes) or not isinstance(download, Sequence):
            raise input_error("download", download, "must be a list of guest paths, not a single string")
        return [(p, validate_guest_path(p, field="download")) for p in download]

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
        state: _RunState,
    ) -> RunResult:
        started = time.perf_counter()
        t = time.perf_counter()
        await self._ensure_image(language)
        setup_ms = elapsed_ms(t)
        lease = await self._provision(language, memory_mb, on_boot_log)
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
                    problem = await self._download_problem(vm, rel)
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
        # The result is complete: stop the VM after returning it (close() waits for that).
        self._retire_later(lease)
        res = outcome.result
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
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            exit_code=res.exit_code,
            execution_time_ms=max(res.duration_ms, 0.0),
            timing=timing,
            language=language,
            timed_out=res.timed_out,
            signal=res.signal,
            stdout_truncated=res.stdout_truncated,
            stderr_truncated=res.stderr_truncated,
            vm_id=vm.vm_id,
            accelerator=vm.accelerator.accel if vm.accelerator else None,
            warm_pool_hit=lease.warm_pool_hit,
            restored_from_snapshot=lease.restored_from_snapshot,
            oom_killed=outcome.oom_killed,
            cpu_seconds=outcome.cpu_seconds,
            guest_unresponsive=outcome.guest_unresponsive,
            files=files,
            download_errors=download_errors,
        )

    async def _download_problem(self, vm: SandboxVm, rel: str) -> str | None:
        """Why ``rel`` cannot be downloaded into memory (None: it can): missing, not a file, too big."""
        parent, _, name = rel.rpartition("/")
        entries = await vm.agent.list_files(parent or ".")
        entry = next((e for e in entries if e.name == name), None)
        if entry is None:
            return f"{rel!r} does not exist"
        if entry.is_dir:
            return f"{rel!r} is a directory"
        if entry.size > self.config.max_file_bytes:
            return f"{rel!r} is {entry.size} bytes, more than max_file_bytes ({self.config.max_file_bytes})"
        return None

    # ------------------------------------------------------------------ sessions

    async def session(
        self,
        language: Language | str = "python",
        *,
        memory_mb: int | None = None,
        env_vars: Mapping[str, str] | None = None,
        idle_timeout_seconds: float | None = None,
    ) -> Session:
        """Boot a VM for a stateful :class:`Session` (``async with await scheduler.session() as s``)."""
        lang = validate_language(language)
        memory = validate_memory_mb(self.config.default_memory_mb if memory_mb is None else memory_mb)
        env = validate_env_vars(env_vars)
        if idle_timeout_seconds is None:
            idle_timeout_seconds = self.config.session_idle_timeout_seconds
        idle = validate_timeout(
            idle_timeout_seconds,
            max_seconds=86400.0,
            field="idle_timeout_seconds",
        )
        self._require_running("open a session in")
        inner = asyncio.get_running_loop().create_task(
            self._open_session(lang, memory, env, idle), name="sbx-session-open"
        )
        session: Session = await self._await_tracked(inner, None)
        return session

    async def _open_session(
        self, language: Language, memory_mb: int, env: dict[str, str], idle: float
    ) -> Session:
        await self._ensure_image(language)
        lease = await self._provision(language, memory_mb, None)
        return await self._new_session(lease, language, memory_mb, env, idle)

    async def _new_session(
        self, lease: VmLease, language: Language, memory_mb: int, env: dict[str, str], idle: float
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
            )
        except BaseException:
            await self._retire(lease)
            raise
        self._sessions.add(session)
        lease.grant.settle()  # an idle session holds memory only: its CPU share goes back to admission
        # ...as long as it really is idle: its QEMU's CPU time is measured, and a session found
        # burning CPU (work its code left running) counts against the CPU budget again.
        lease.grant.meter_cpu(lease.vm.cpu_seconds)
        return session

    async def _fork_session(self, parent: Session) -> Session:
        """``parent.fork()``: reserve capacity, clone the VM while the session is quiet, wrap it."""
        self._require_running("fork a session in")
        inner = asyncio.get_running_loop().create_task(self._fork(parent), name="sbx-session-fork")
        session: Session = await self._await_tracked(inner, None)
        return session

    async def _fork(self, parent: Session) -> Session:
        grant = await self.admission.acquire(parent.memory_mb, self.config.default_vcpus)
        try:
            async with parent.exclusive() as vm:
                clone = await fork_vm(vm, settings=self.settings, runtime_dir=self._runtime_dir)
        except BaseException:
            grant.release()
            raise
        lease = VmLease(
            vm=clone,
            grant=grant,
            cgroup=self._attach_cgroup(clone, parent.memory_mb),
            restored_from_snapshot=True,
        )
        return await self._new_session(
            lease, parent.language, parent.memory_mb, dict(parent.env_vars), parent.idle_timeout_seconds
        )

    # ------------------------------------------------------------------ VMs

    async def _ensure_image(self, language: Language) -> Path:
        """Find (building on first use) the language's image, pool its overlays, start its warm pool."""
        known = self._images.get(language)
        if known is not None:
            return known
        async with self._image_lock:
            if language not in self._images:
                bundle = await self._vm_manager.aget_bundle(language)
                base = bundle.rootfs.absolute()
                if self._pool is not None:
                    await self._pool.start([base])  # registers the base with the running pool
                self._images[language] = base
                await self._start_warm_pool(language)
            return self._images[language]

    async def _start_warm_pool(self, language: Language) -> None:
        if self.config.warm_pool_size == 0 or language in self._warm_pools:
            return
        if self._state is not SchedulerState.RUNNING:
            return
        pool = WarmPool(
            self._pooled_vm,
            self.config.warm_pool_size,
            self._admission,
            languages=[language],
            memory_mb=self.config.default_memory_mb,
            vcpus=self.config.default_vcpus,
            refill_concurrency=self.config.warm_pool_refill_concurrency,
            foreground=self._foreground,
        )
        self._warm_pools[language] = pool
        await pool.start()
        logger.info("warm pool for %s: %d ready VM(s) kept", language, self.config.warm_pool_size)

    async def prewarm(
        self,
        languages: Iterable[Language | str] = ("python",),
        *,
        wait: bool = True,
        timeout_seconds: float | None = None,
    ) -> None:
        """Build/find the images of ``languages`` and start their warm pools (and, with snapshots on,
        fill the snapshot cache with the first cold boot). ``wait``: return only when every pool
        holds ``config.warm_pool_size`` VMs (or ``timeout_seconds`` passed: ``TimeoutError``)."""
        self._require_running("prewarm")
        langs = [validate_language(lang) for lang in languages]
        for lang in langs:
            await self._ensure_image(lang)
        if not wait:
            return
        async with asyncio.timeout(timeout_seconds):
            for lang in langs:
                pool = self._warm_pools.get(lang)
                while pool is not None and pool.idle_count(lang) < pool.size_per_language:
                    self._require_running("prewarm")
                    await asyncio.sleep(0.02)

    def _vm_options(self, language: Language, memory_mb: int) -> VmOptions:
        return VmOptions(
            language=language,
            memory_mb=memory_mb,
            vcpus=self.config.default_vcpus,
            boot_timeout_s=_BOOT_TIMEOUT_S,
            network=self.config.network_enabled,
        )

    async def _provision(
        self, language: Language, memory_mb: int, on_boot_log: BootLogCallback | None
    ) -> VmLease:
        """A ready VM with the capacity it holds: from the warm pool, else a snapshot restore, else a
        cold boot (see the module docstring)."""
        pool = self._warm_pools.get(language)
        if pool is not None and memory_mb == pool.memory_mb:
            pooled = await pool.checkout(language)
            if pooled is not None:
                assert pooled.grant is not None  # the pools are made with this admission controller
                if self._can_renice:
                    pooled.vm.set_nice(self._base_nice)  # it serves a caller now: our own priority
                await self._note_no_boot(on_boot_log, "a ready VM from the warm pool")
                return VmLease(
                    vm=pooled.vm,
                    grant=pooled.grant,
                    cgroup=self._attach_cgroup(pooled.vm, memory_mb),
                    warm_pool_hit=True,
                    restored_from_snapshot=pooled.vm.timing.restored,
                )
        grant = await self.admission.acquire(memory_mb, self.config.default_vcpus)
        try:
            vm, attempts = await self._boot(self._vm_options(language, memory_mb), on_boot_log)
        except BaseException:
            grant.release()
            raise
        if vm.timing.restored:
            await self._note_no_boot(on_boot_log, "restored from a memory snapshot")
        return VmLease(
            vm=vm,
            grant=grant,
            boot_attempts=attempts,
            cgroup=self._attach_cgroup(vm, memory_mb),
            restored_from_snapshot=vm.timing.restored,
        )

    @staticmethod
    async def _note_no_boot(on_boot_log: BootLogCallback | None, where: str) -> None:
        if on_boot_log is None:
            return
        try:
            value = on_boot_log(f"[sandbox] no boot: {where}")
            if value is not None:
                await value
        except Exception:  # a broken log callback must not break the run
            logger.exception("on_boot_log callback failed")

    async def _pooled_vm(self, language: Language) -> SandboxVm:
        """The warm pool's factory: a ready VM with the REPL (and a spare interpreter) warm.

        Made at a low CPU priority (when it can be raised again at checkout): on a small host a
        refill otherwise competes for the cores with the very run that just emptied the pool."""
        options = self._vm_options(language, self.config.default_memory_mb)
        nice = BACKGROUND_NICE if self._can_renice else 0
        vm = await self._make_vm(options, nice=nice)
        try:
            # Also after a restore: the pool counts a VM only once its REPL and spare interpreter are
            # up (and done with any post-restore reseed the agent queued), so a hit never waits.
            await warm_vm(vm)
        except BaseException:
            await vm.close()
            raise
        return vm

    async def _make_vm(
        self, options: VmOptions, *, on_boot_log: BootLogCallback | None = None, nice: int = 0
    ) -> SandboxVm:
        """One VM: restored from the snapshot cache (or cold-booted into it), or cold-booted."""
        if self._snapshots is not None:
            vm, _ = await self._snapshots.restore_or_boot(
                options, runtime_dir=self._runtime_dir, overlay_pool=self._pool, on_boot_log=on_boot_log,
                nice=nice,
            )
            return vm
        return await SandboxVm.boot(
            options,
            settings=self.settings,
            vm_manager=self._vm_manager,
            overlay_pool=self._pool,
            runtime_dir=self._runtime_dir,
            on_boot_log=on_boot_log,
            nice=nice,
        )

    async def _boot(self, options: VmOptions, on_boot_log: BootLogCallback | None) -> tuple[SandboxVm, int]:
        for attempt in range(1, _BOOT_ATTEMPTS + 1):
            try:
                return await self._make_vm(options, on_boot_log=on_boot_log), attempt
            except VmCapacityError:
                raise
            except SandboxTransientError as exc:
                if attempt >= _BOOT_ATTEMPTS or self._state is not SchedulerState.RUNNING:
                    raise
                logger.warning("VM boot failed (%s); retrying once with a fresh VM", exc.message)
        raise AssertionError("unreachable")  # pragma: no cover

    def _retire_later(self, lease: VmLease) -> None:
        """Retire in the background (off the caller's path); ``close()`` waits for it."""
        task = asyncio.get_running_loop().create_task(
            self._retire(lease), name=f"sbx-retire-{lease.vm.vm_id}"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("stopping a VM after its run failed: %r", task.exception())

    async def _retire(self, lease: VmLease) -> None:
        """Stop a leased VM and return its capacity (runs to completion even when cancelled)."""
        try:
            await lease.vm.close()
            if lease.cgroup is not None:
                await lease.cgroup.release()
        finally:
            lease.grant.release()
