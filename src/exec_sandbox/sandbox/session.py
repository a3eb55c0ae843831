"""``Session``: one long-lived sandbox VM whose interpreter keeps its state between ``exec`` calls.

Made by :meth:`Scheduler.session <exec_sandbox.sandbox.scheduler.Scheduler.session>`::

    async with await scheduler.session(language="python") as s:
        await s.exec("x = 41")
        (await s.exec("print(x + 1)")).stdout        # "42\\n"

State kept between execs: Python / JavaScript variables, imports and functions (one persistent REPL
in the guest); for ``raw`` (shell) the environment and the working directory. Files written with
:meth:`write_file` or by the code stay in the work dir until the session closes.

Lifecycle (:class:`SessionState`)::

    OPEN --close() / idle timeout / Scheduler closed / VM failed / guest unresponsive--> CLOSED
                                                                    (close() is idempotent)

- Calls (``exec`` and the file operations) run one at a time, in call order; ``exec_count`` counts
  the execs that reached the guest. :meth:`Session.exclusive` holds the session quiet (for example
  to snapshot or fork its VM).
- :meth:`fork` clones the session - interpreter memory and work-dir files - into a new, independent
  session with its own VM (and its own admission capacity, idle timeout and lifecycle); from the
  fork point on the two diverge, and the clone's RNG is reseeded so they draw different random
  numbers. The parent is paused only while its snapshot is taken.
- :meth:`save` writes the session's VM (memory, device state and disk) to a snapshot directory
  while the session is quiet; :meth:`Scheduler.restore_session` makes a new session from one
  (e.g. to pause a sandbox to disk and resume it later, in another process).
- Timeout: the exec returns ``exit_code == -1``, ``timed_out=True`` and a stderr note; the guest
  restarts the interpreter, so the session stays usable but its interpreter state is lost (the note
  says so). Files survive.
- Idle timeout: no call for ``idle_timeout_seconds`` closes the session (and frees its VM and its
  admission capacity); later calls raise :class:`SessionClosedError` with ``reason="idle_timeout"``.
- A call on a closed session raises :class:`SessionClosedError` (``context["reason"]``); an exec in
  flight when the session closes raises :class:`CommunicationOutcomeUnknownError`. If the VM dies
  under an exec (outcome unknown), the session closes itself (``reason="vm_failed"``).
- The host enforces the deadline: an exec returns at most
  :data:`~exec_sandbox.vm.execution.HOST_DEADLINE_GRACE_S` after its timeout. If the guest had not
  answered by then, the result has ``timed_out`` and ``guest_unresponsive``, the VM is destroyed
  and the session closed (``reason="guest_unresponsive"``; the next call raises
  :class:`SessionClosedError`).
- Processes an exec starts die with it (a cgroup per exec in the guest); the interpreter and its
  state survive. :meth:`cpu_seconds` is the VM's CPU time, measured on the host.

Paths are confined to the guest work dir (``/home/sandbox``): relative paths are taken from it,
absolute ones must lie under it (:func:`~exec_sandbox.validation.validate_guest_path`); the guest
agent resolves them again on its side. Files move in sha256-checked chunks.

Reads are capped by the host as bytes arrive (``max_bytes``, default ``config.max_file_bytes``):
past the cap the read ends with :class:`~exec_sandbox.errors.GuestFileTooLargeError` (path, cap,
bytes received) and nothing beyond the cap is kept, however the guest's file grows meanwhile. Large
files: :meth:`Session.iter_file` (chunks, bounded memory) or ``read_file(path, Path(...))`` (a
private temp file renamed into place). A guest that breaks the protocol or floods past a cap raises
:class:`~exec_sandbox.errors.GuestProtocolError` and the session closes (``reason="vm_failed"``; its
VM is killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from exec_sandbox.client.agent import OutputCallback
from exec_sandbox.client.process import DEFAULT_PROCESS_OUTPUT_CAP, ProcessHandle
from exec_sandbox.config import SchedulerConfig
from exec_sandbox.egress.accounting import EgressLogEntry, EgressStats
from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestProtocolError,
    SandboxError,
    SandboxPermanentError,
)
from exec_sandbox.models import ExecutionResult, FileInfo, Language, PortForward, TimingBreakdown
from exec_sandbox.packages.lock import PackageLock
from exec_sandbox.protocol.process import WatchEvent
from exec_sandbox.sandbox.foreground import ForegroundActivity
from exec_sandbox.sandbox.lifecycle_errors import CloseReason, SessionClosedError
from exec_sandbox.timing import elapsed_ms
from exec_sandbox.validation import (
    input_error,
    validate_code,
    validate_env_vars,
    validate_guest_path,
    validate_timeout,
)
from exec_sandbox.vm.execution import execute_in_vm
from exec_sandbox.vm.sandbox_vm import SandboxVm
from smartvm.cleanup import AsyncClosing

if TYPE_CHECKING:
    from exec_sandbox.egress import EgressGateway
    from exec_sandbox.sandbox.network import NetworkPlan

__all__ = ["Session", "SessionState"]

logger = logging.getLogger(__name__)


class SessionState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"



class Session(AsyncClosing):
    """A stateful sandbox. Do not construct directly: use ``await scheduler.session(...)``."""

    def __init__(
        self,
        *,
        vm: SandboxVm,
        retire: Callable[[], Awaitable[None]],
        config: SchedulerConfig,
        language: Language,
        memory_mb: int,
        env_vars: Mapping[str, str],
        idle_timeout_seconds: float,
        on_closed: Callable[[Session], Awaitable[None] | None] | None = None,
        fork: Callable[[Session], Awaitable[Session]] | None = None,
        warm_pool_hit: bool = False,
        restored_from_snapshot: bool = False,
        foreground: ForegroundActivity | None = None,
        egress: EgressGateway | None = None,
        forwarded_ports: tuple[PortForward, ...] = (),
        network: NetworkPlan | None = None,
    ) -> None:
        self._vm = vm
        self._egress = egress  # closes with the VM; its log stays readable after
        # Which host address:port serves which guest port (host ports 0 made concrete).
        self.forwarded_ports: tuple[PortForward, ...] = forwarded_ports
        self.network = network  # the plan it was made with (a fork gets its own gateway by it)
        self._foreground = foreground or ForegroundActivity()  # execs count as foreground work
        self._fork = fork  # makes the clone (the Scheduler: capacity, fork_vm, registration)
        self.warm_pool_hit = warm_pool_hit  # the VM came ready from the warm pool
        self.restored_from_snapshot = restored_from_snapshot  # ... or from a memory snapshot
        self.packages: PackageLock | None = None  # what packages= installed (exact versions)
        self.packages_cache_hit: bool | None = None  # their L2 layer was cached already
        self._retire = retire  # stops the VM and returns its capacity (admission grant, cgroup)
        self._config = config
        self.language: Language = language
        self.memory_mb = memory_mb
        self.env_vars: dict[str, str] = dict(env_vars)
        self.idle_timeout_seconds = idle_timeout_seconds
        self._on_closed = on_closed
        self._state = SessionState.OPEN
        self._close_reason: CloseReason | None = None
        self._exec_lock = asyncio.Lock()
        self._busy = 0
        self._last_used = asyncio.get_running_loop().time()
        self._exec_count = 0
        self._close_task: asyncio.Task[None] | None = None
        self._idle_task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._idle_watch(), name=f"sbx-session-idle-{vm.vm_id}"
        )

    # ------------------------------------------------------------------ introspection

    @property
    def exec_count(self) -> int:
        """How many ``exec`` calls reached the guest (including ones that failed or timed out)."""
        return self._exec_count

    @property
    def closed(self) -> bool:
        return self._state is SessionState.CLOSED

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def close_reason(self) -> CloseReason | None:
        return self._close_reason

    @property
    def vm_id(self) -> str:
        return self._vm.vm_id

    @property
    def vm(self) -> SandboxVm:
        """The session's VM (for inspection and for layers above, e.g. snapshot-based fork)."""
        return self._vm

    @property
    def egress_log(self) -> list[EgressLogEntry]:
        """Every connection (or refused attempt) through this session's egress gateway so far."""
        return self._egress.egress_log() if self._egress is not None else []

    @property
    def egress_stats(self) -> EgressStats | None:
        """Egress totals (None: the session has no network)."""
        return self._egress.stats.model_copy() if self._egress is not None else None

    def __repr__(self) -> str:
        return f"Session(vm_id={self.vm_id!r}, language={self.language!r}, state={self._state.value!r})"

    # ------------------------------------------------------------------ exec

    async def exec(
        self,
        code: str,
        *,
        timeout_seconds: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        env_vars: Mapping[str, str] | None = None,
    ) -> ExecutionResult:
        """Run ``code`` in the session's interpreter; see the module docstring for the semantics."""
        code = validate_code(code, max_bytes=self._config.max_code_bytes)
        timeout = validate_timeout(
            self._config.default_timeout_seconds if timeout_seconds is None else timeout_seconds,
            max_seconds=self._config.max_timeout_seconds,
        )
        env = {**self.env_vars, **validate_env_vars(env_vars)}
        started = time.perf_counter()
        async with self._activity(), self._exec_lock:
            self._check_open()
            self._exec_count += 1
            try:
                with self._foreground.track():
                    outcome = await execute_in_vm(
                        self._vm,
                        code,
                        language=self.language,
                        session=True,
                        timeout_s=timeout,
                        env=env,
                        max_output_bytes=self._config.max_output_bytes,
                        memory_mb=self.memory_mb,
                        on_stdout=on_stdout,
                        on_stderr=on_stderr,
                    )
            except SandboxError as exc:
                raise await self._exec_failed(exc) from exc
            if outcome.guest_unresponsive:
                # The host ended the run at its deadline: the guest is wedged or hostile. The result
                # goes back now; the VM is destroyed behind it, and the next call says why.
                logger.warning("session %s: guest did not answer by the deadline; closing", self.vm_id)
                self._close_soon("guest_unresponsive")
        return ExecutionResult(
            **outcome.result_fields(self._vm),
            timing=TimingBreakdown(execute_ms=outcome.execute_ms, total_ms=elapsed_ms(started)),
            language=self.language,
        )

    async def start_process(
        self,
        argv: Sequence[str],
        *,
        env_vars: Mapping[str, str] | None = None,
        cwd: str | None = None,
        root: bool = False,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        timeout_seconds: float | None = None,
        max_output_bytes: int = DEFAULT_PROCESS_OUTPUT_CAP,
    ) -> ProcessHandle:
        """Start ``argv`` in the guest beside the session's interpreter; see
        :meth:`ProcessControl.start_process <exec_sandbox.client.process.ProcessControl.start_process>`.

        It runs while other calls run (no session lock), in a cgroup of its own, as the sandbox user
        (``root=True``: as root) with the VM's network env (proxy, secret placeholders) and the
        session's env vars under ``env_vars``; it dies with the session, and a running one keeps the
        session from its idle timeout.
        """
        self._check_open()
        vm = self._vm
        # net_env (proxy settings, secret placeholders) as for execs: a networked process needs it too.
        env = {**vm.options.env, **vm.net_env, **self.env_vars, **validate_env_vars(env_vars)}
        handle: ProcessHandle = await self._guarded(vm.agent.start_process(
            argv, env=env, cwd=cwd, root=root, stdin=stdin, pty=pty, timeout_s=timeout_seconds,
            max_output_bytes=max_output_bytes))
        self._busy += 1

        def ended() -> None:
            self._busy -= 1
            self._last_used = asyncio.get_running_loop().time()

        handle.on_done(ended)
        return handle

    def watch_dir(self, path: str, *, recursive: bool = False) -> AsyncGenerator[list[WatchEvent], None]:
        """Batches of file system events under the guest directory ``path`` (absolute; see
        :meth:`WatchControl.watch_dir <exec_sandbox.client.watch.WatchControl.watch_dir>`): the first,
        empty batch once the watch is in place. Close the generator to stop watching."""
        self._check_open()
        return self._vm.agent.watch_dir(path, recursive=recursive)

    async def _exec_failed(self, exc: SandboxError) -> SandboxError:
        """The error to raise for a failed exec; closes the session when its VM is unusable."""
        if self.closed:
            reason = self._close_reason or "closed"
            if isinstance(exc, CommunicationOutcomeUnknownError):
                return CommunicationOutcomeUnknownError(
                    f"the session closed ({reason}) while the code was running",
                    context={**exc.context, "reason": reason, "vm_id": self.vm_id},
                )
            return SessionClosedError(
                f"the session is closed ({reason})", context={"reason": reason, "vm_id": self.vm_id}
            )
        if isinstance(exc, CommunicationOutcomeUnknownError | GuestProtocolError):
            # The agent link is gone or wedged, or the guest misbehaved: kill the VM.
            logger.warning("session %s: VM lost or misbehaving (%s); closing the session", self.vm_id, exc)
            await self._close("vm_failed")
        return exc

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[SandboxVm]:
        """Wait for the running call to finish and keep others out; yields the (idle) VM.

        For layers that must see the guest at rest, e.g. a snapshot-based fork. The session does not
        count as idle meanwhile.
        """
        async with self._activity(), self._exec_lock:
            self._check_open()
            yield self._vm

    async def fork(self) -> Session:
        """A new, independent session cloned from this one now (memory and disk); see the module
        docstring. Waits for the running call to finish. Raises :class:`SessionClosedError` on a
        closed session, :class:`VmCapacityError` when no capacity frees up for the clone in time,
        and :class:`SandboxTransientError` if the clone could not be made (this session goes on)."""
        self._check_open()
        if self._fork is None:
            raise SandboxPermanentError(
                "this session cannot be forked (it was not made by a Scheduler)",
                context={"vm_id": self.vm_id},
            )
        return await self._fork(self)

    async def save(self, directory: Path) -> Path:
        """Snapshot the session's VM (memory + disk) into ``directory`` (must not exist) once the
        running call is done; the session goes on. Restore it with ``Scheduler.restore_session``.
        The directory holds guest memory: put it in a private (0700) place."""
        async with self.exclusive() as vm:
            return await vm.save_snapshot(directory)

    # ------------------------------------------------------------------ files

    async def write_file(
        self, path: str, data: bytes | Path | IO[bytes], *, make_executable: bool = False
    ) -> None:
        """Write ``data`` (bytes, a local file, or a binary file object) to ``path`` in the work dir."""
        rel = validate_guest_path(path)
        if isinstance(data, bytes | bytearray | memoryview):
            size: int | None = len(data)
        elif isinstance(data, Path):
            try:
                size = (await asyncio.to_thread(data.stat)).st_size
            except OSError as exc:
                raise input_error("data", str(data), f"cannot read the local file: {exc}") from None
        else:
            size = None
        if size is not None and size > self._config.max_file_bytes:
            raise input_error(
                "data",
                f"<{size} bytes>",
                f"is larger than max_file_bytes ({self._config.max_file_bytes})",
                size_bytes=size,
                limit_bytes=self._config.max_file_bytes,
            )
        async with self._activity(), self._exec_lock:
            self._check_open()
            await self._guarded(self._vm.agent.write_file(rel, data, make_executable=make_executable))

    async def read_file(
        self, path: str, destination: Path | IO[bytes] | None = None, *, max_bytes: int | None = None
    ) -> bytes | None:
        """Read ``path`` from the work dir: returns the bytes, or None after writing to ``destination``.

        At most ``max_bytes`` (default ``config.max_file_bytes``), counted as they arrive; a larger
        file raises :class:`GuestFileTooLargeError`. A ``Path`` destination gets a private temp file
        renamed into place (a symlink there is refused); memory stays bounded.
        """
        rel = validate_guest_path(path)
        cap = self._read_cap(max_bytes)
        async with self._activity(), self._exec_lock:
            self._check_open()
            if destination is None:
                data: bytes = await self._guarded(self._vm.agent.read_file(rel, max_bytes=cap))
                return data
            await self._guarded(self._vm.agent.read_file(rel, destination, max_bytes=cap))
            return None

    async def iter_file(self, path: str, *, max_bytes: int | None = None) -> AsyncGenerator[bytes, None]:
        """Stream ``path`` from the work dir in chunks (<= 1 MiB each) with bounded host memory.

        ``max_bytes`` as in :meth:`read_file`. The session is busy (other calls wait) until the
        iteration ends; use ``async with contextlib.aclosing(s.iter_file(p)) as chunks`` when you may
        stop early. The whole-file sha256 is checked at the end: treat the data as confirmed only
        when the iteration finished without an error.
        """
        rel = validate_guest_path(path)
        cap = self._read_cap(max_bytes)
        async with self._activity(), self._exec_lock:
            self._check_open()
            chunks = self._vm.agent.iter_file(rel, max_bytes=cap)
            async with contextlib.aclosing(chunks):
                while True:
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        return
                    except SandboxError as exc:
                        raise await self._exec_failed(exc) from exc
                    yield chunk

    def _read_cap(self, max_bytes: int | None) -> int:
        if max_bytes is None:
            return self._config.max_file_bytes
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise input_error("max_bytes", max_bytes, "must be an int >= 0")
        return max_bytes

    async def list_files(self, path: str = ".") -> list[FileInfo]:
        """Entries of a directory in the work dir (default: the work dir itself).

        At most 10,000 entries: of a bigger directory, the first 10,000 by name (a warning is logged).
        """
        rel = validate_guest_path(path, allow_workdir=True)
        async with self._activity(), self._exec_lock:
            self._check_open()
            entries = await self._guarded(self._vm.agent.list_files(rel))
        return [FileInfo(name=e.name, is_dir=e.is_dir, size=e.size, is_symlink=e.is_symlink) for e in entries]

    async def _guarded(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except SandboxError as exc:
            raise await self._exec_failed(exc) from exc

    # ------------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._state is SessionState.CLOSED:
            reason = self._close_reason or "closed"
            raise SessionClosedError(
                f"the session is closed ({reason})", context={"reason": reason, "vm_id": self.vm_id}
            )

    @contextlib.asynccontextmanager
    async def _activity(self) -> Any:
        self._check_open()
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self._last_used = asyncio.get_running_loop().time()

    async def _idle_watch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._state is SessionState.OPEN:
            remaining = self._last_used + self.idle_timeout_seconds - loop.time()
            if remaining > 0 or self._busy:
                await asyncio.sleep(max(remaining, 0.05))
                continue
            logger.info("session %s idle for %.0fs; closing", self.vm_id, self.idle_timeout_seconds)
            self._idle_task = None  # close() must not cancel the task running it
            await self._close("idle_timeout")
            return

    async def aclose(self) -> None:
        """Stop the VM and free its capacity. Idempotent; safe while an exec runs (it fails)."""
        await self._close("closed")

    close = aclose  # the older name, kept

    async def _close(self, reason: CloseReason) -> None:
        # Every caller waits for the one teardown; shielded so a cancelled caller cannot cut it short.
        await asyncio.shield(self._close_soon(reason))

    def _close_soon(self, reason: CloseReason) -> asyncio.Task[None]:
        """Close now (calls fail from here on) and start the one teardown; returns its task."""
        if self._close_task is None:
            self._close_reason = reason
            self._state = SessionState.CLOSED
            self._close_task = asyncio.get_running_loop().create_task(
                self._teardown(), name=f"sbx-session-close-{self.vm_id}"
            )
        return self._close_task

    def cpu_seconds(self) -> float | None:
        """CPU seconds the session's VM (its QEMU process) has used so far, measured on the host."""
        return self._vm.cpu_seconds()

    async def _teardown(self) -> None:
        idle, self._idle_task = self._idle_task, None
        if idle is not None and idle is not asyncio.current_task():
            idle.cancel()
            await asyncio.wait([idle])
        try:
            await self._retire()
        finally:
            if self._on_closed is not None:
                try:
                    value = self._on_closed(self)
                    if value is not None:
                        await value
                except Exception:  # bookkeeping only; the VM is already gone
                    logger.exception("session close hook failed")

