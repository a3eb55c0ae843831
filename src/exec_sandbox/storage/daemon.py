"""One long-lived ``qemu-storage-daemon`` that creates qcow2 overlays over QMP.

Creating an overlay through a running daemon (blockdev-create file -> blockdev-add
-> blockdev-create qcow2 with a backing file -> blockdev-del) avoids forking
``qemu-img`` per VM. The daemon:

- runs in its own process group with a parent-death signal (``smartvm.process``),
  so it never outlives the Python process that started it;
- talks QMP with us over an inherited, already connected socket: QEMU 7.2 greets a
  client of a *listening* monitor socket twice when it connects while the monitor
  is still being set up (measured: about 1 start in 1,500), which breaks the
  capabilities negotiation; a socket connected before the daemon starts is greeted
  exactly once, and nothing needs to poll for the daemon to listen;
- also listens on a QMP socket in a private directory of its own (``0700``, made by
  ``mkdtemp`` under the verified runtime dir, with an owner record naming us and the daemon:
  :mod:`smartvm.leftovers`), for operators (``qmp-shell``) and for telling daemons apart;
- runs with umask 077, so the overlays it creates are ``0600`` from creation;
- serialises commands (one overlay at a time: QMP job events and node names stay
  unambiguous, and the daemon's main loop is single-threaded anyway);
- undoes a half-made overlay (jobs, nodes, the file) on any failure or cancellation.

The base image's format and size come from ``qemu-img info`` (cached per file
identity): QMP cannot probe formats, and a failed probe must not touch the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient

from exec_sandbox.errors import QemuStorageDaemonError
from exec_sandbox.storage.qcow2 import (
    absolute_path,
    build_file_create_options,
    build_qcow2_create_options,
    ensure_qcow2,
    escape_qemu_option_value,
    get_image_info,
    overlay_size,
    refuse_existing,
    remove_partial,
)
from smartvm.cleanup import AsyncService, shielded
from smartvm.hostfs import UnsafePathError
from smartvm.leftovers import (
    make_owned_dir,
    private_runtime_dir,
    process_start_ticks,
    read_owner_record,
    reap_leftovers,
    remove_owned_dir,
    write_owner_record,
)
from smartvm.process import ChildProcess, stop_ladder

__all__ = [
    "DaemonState",
    "QemuStorageDaemon",
    "QemuStorageDaemonError",
    "build_daemon_argv",
]

logger = logging.getLogger(__name__)


# Linux caps sun_path at 108 bytes including the NUL.
_MAX_UNIX_PATH = 107
_RUNTIME_PREFIX = "exec-sandbox-qsd-"


class DaemonState(StrEnum):
    """Lifecycle of a :class:`QemuStorageDaemon`."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # the process died while it should have been running


# --------------------------------------------------------------------------- pure builders


def build_daemon_argv(binary: str, socket_path: Path, qmp_fd: int) -> list[str]:
    """argv of a daemon serving QMP on the connected socket ``qmp_fd`` (ours) and on a
    listening unix socket at ``socket_path`` (operators'); no block exports."""
    listening = f"socket,id=qmp1,path={escape_qemu_option_value(str(socket_path))},server=on,wait=off"
    return [
        binary,
        "--chardev",
        f"socket,id=qmp0,fd={qmp_fd}",
        "--monitor",
        "chardev=qmp0",
        "--chardev",
        listening,
        "--monitor",
        "chardev=qmp1",
    ]


# --------------------------------------------------------------------------- process helpers


def _event_data(event: Mapping[str, object]) -> dict[str, Any]:
    data = event.get("data")
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- the daemon


class QemuStorageDaemon(AsyncService):
    """A ``qemu-storage-daemon`` process and its QMP connection.

    ``start()`` is idempotent; ``stop()`` is idempotent and safe in any state
    (QMP ``quit`` -> SIGTERM -> SIGKILL to the process group). After the process
    dies unexpectedly, ``started`` is False and ``start()`` launches a new one.
    """

    def __init__(
        self,
        binary: str = "qemu-storage-daemon",
        *,
        runtime_dir: Path | None = None,
        qemu_img: str = "qemu-img",
        start_timeout: float = 10.0,
        command_timeout: float = 30.0,
        stop_timeout: float = 3.0,
    ) -> None:
        self._binary = binary
        self._runtime_parent = Path(runtime_dir) if runtime_dir is not None else None
        self._qemu_img = qemu_img
        self._start_timeout = start_timeout
        self._command_timeout = command_timeout
        self._stop_timeout = stop_timeout

        self._state = DaemonState.NEW
        self._lifecycle_lock = asyncio.Lock()
        self._command_lock = asyncio.Lock()
        self._process: ChildProcess | None = None
        self._last_process: ChildProcess | None = None  # its stderr tail outlives the teardown
        self._qmp: QMPClient | None = None
        self._runtime_dir: Path | None = None
        self._socket_path: Path | None = None
        self._exit_task: asyncio.Task[int] | None = None

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> DaemonState:
        if self._state is DaemonState.RUNNING and self._exited():
            return DaemonState.FAILED
        return self._state

    @property
    def started(self) -> bool:
        """True while the daemon process is running and QMP is connected."""
        return self.state is DaemonState.RUNNING

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def socket_path(self) -> Path | None:
        return self._socket_path

    def stderr_tail(self) -> str:
        return self._last_process.stderr_tail() if self._last_process is not None else ""

    def _exited(self) -> bool:
        if self._process is None or self._process.returncode is not None:
            return True
        return self._exit_task is not None and self._exit_task.done()

    def __repr__(self) -> str:
        return f"<QemuStorageDaemon state={self.state} pid={self.pid} socket={self._socket_path}>"


    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Launch the daemon and wait until QMP answers. No-op when already running."""
        async with self._lifecycle_lock:
            if self.started:
                return
            if self._process is not None or self._runtime_dir is not None:
                # A previous daemon died: clear its leftovers before starting afresh.
                await shielded(self._teardown())
            self._state = DaemonState.STARTING
            try:
                await self._launch()
            except BaseException:
                await shielded(self._teardown())
                self._state = DaemonState.STOPPED
                raise
            self._state = DaemonState.RUNNING
            logger.debug("qemu-storage-daemon started (pid %s, socket %s)", self.pid, self._socket_path)

    async def stop(self) -> None:
        """Stop the daemon and remove its socket and runtime dir. Safe in any state."""
        async with self._lifecycle_lock:
            if self._state in (DaemonState.NEW, DaemonState.STOPPED) and self._process is None:
                self._state = DaemonState.STOPPED
                return
            self._state = DaemonState.STOPPING
            try:
                await shielded(self._stop_after_current_command())
            finally:
                self._state = DaemonState.STOPPED

    aclose = stop  # the one close verb of every async-with object (stop pairs with start)

    async def _stop_after_current_command(self) -> None:
        """Let a running overlay creation finish (briefly) so it is not torn in half, then tear down."""
        lock = self._command_lock
        try:
            async with asyncio.timeout(self._stop_timeout):
                await lock.acquire()
        except TimeoutError:
            await self._teardown()  # a stuck command: in-flight callers get "stopped during ..."
            return
        try:
            await self._teardown()
        finally:
            lock.release()

    async def _launch(self) -> None:
        parent = self._runtime_parent
        try:
            parent = private_runtime_dir(parent)
            reap_leftovers(parent)  # daemons (and VMs) of dead owners, by their owner records
            self._runtime_dir = make_owned_dir(parent, _RUNTIME_PREFIX, kind="qemu-storage-daemon")
        except (OSError, UnsafePathError) as exc:
            raise QemuStorageDaemonError(
                f"Cannot create a runtime dir for qemu-storage-daemon under {parent or 'the default'}: {exc}",
                context={"path": str(parent) if parent else None},
            ) from exc
        socket_path = self._runtime_dir / "qmp.sock"
        if len(os.fsencode(socket_path)) > _MAX_UNIX_PATH:
            raise QemuStorageDaemonError(
                f"QMP socket path {socket_path} is longer than {_MAX_UNIX_PATH} bytes; "
                "use a shorter runtime_dir"
            )
        self._socket_path = socket_path
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = build_daemon_argv(self._binary, socket_path, theirs.fileno())
        self._last_process = None
        try:
            # Own process group: the kill ladder reaches everything.
            self._process = await ChildProcess.spawn(
                argv, new_session=True, stdout="devnull", stderr="tail", pass_fds=(theirs.fileno(),)
            )
        except OSError as exc:
            ours.close()
            raise QemuStorageDaemonError(
                f"Cannot run qemu-storage-daemon ({self._binary}): {exc}", context={"command": argv}
            ) from exc
        finally:
            theirs.close()  # the daemon holds its end now; EOF on ours means it is gone
        self._last_process = self._process
        record = read_owner_record(self._runtime_dir)
        if record is not None:  # the daemon, so a later reaper can prove it is ours
            record.qemu_pid = self._process.pid
            record.qemu_start = process_start_ticks(self._process.pid)
            record.marker = str(socket_path)
            write_owner_record(self._runtime_dir, record)
        self._exit_task = asyncio.create_task(self._process.wait())
        self._exit_task.add_done_callback(self._on_exit)
        # Registered before connecting so a half-done handshake is undone by _teardown.
        self._qmp = QMPClient(f"qsd-{self._process.pid}")
        try:
            async with asyncio.timeout(self._start_timeout):
                try:
                    await self._qmp.connect(ours)
                except BaseException:
                    ours.close()
                    raise
        except TimeoutError as exc:
            raise QemuStorageDaemonError(
                f"qemu-storage-daemon did not become QMP-ready within {self._start_timeout}s; "
                f"stderr: {self.stderr_tail() or '(empty)'}",
                context={"command": argv, "stderr": self.stderr_tail()},
            ) from exc
        except Exception as exc:  # qemu.qmp greeting/negotiation failures, or EOF from a dead daemon
            exit_code = await self._exit_code_soon()
            if exit_code is not None:
                raise QemuStorageDaemonError(
                    f"qemu-storage-daemon exited with code {exit_code} before QMP was ready; "
                    f"stderr: {self.stderr_tail() or '(empty)'}",
                    context={"exit_code": exit_code, "stderr": self.stderr_tail()},
                ) from exc
            raise QemuStorageDaemonError(
                f"QMP handshake with qemu-storage-daemon failed: {exc}; "
                f"stderr: {self.stderr_tail() or '(empty)'}",
                context={"command": argv, "stderr": self.stderr_tail()},
            ) from exc

    async def _exit_code_soon(self, grace: float = 1.0) -> int | None:
        """Its exit code if the daemon exits within ``grace`` seconds (stderr read to the end), else None."""
        assert self._exit_task is not None
        try:
            async with asyncio.timeout(grace):
                code = await asyncio.shield(self._exit_task)
        except TimeoutError:
            return None
        await self._stderr_settled()
        return code

    def _on_exit(self, task: asyncio.Task[int]) -> None:
        if self._state is DaemonState.RUNNING and not task.cancelled():
            logger.warning(
                "qemu-storage-daemon exited unexpectedly (code %s); stderr: %s",
                task.result(),
                self.stderr_tail() or "(empty)",
            )

    async def _stderr_settled(self) -> None:
        if self._process is not None:
            await self._process.settle_output(1.0)

    async def _teardown(self) -> None:
        """The shutdown ladder and removal of every leftover. Runs to completion once begun."""
        process, qmp = self._process, self._qmp
        self._qmp = None
        asked_to_quit = False
        if qmp is not None:
            if process is not None and not self._exited():
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self._stop_timeout):
                        await qmp.execute("quit")
                        asked_to_quit = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._stop_timeout):
                    await qmp.disconnect()
        if process is not None:

            async def quit_was_sent() -> bool:
                return asked_to_quit  # sent above, before disconnecting

            if not await stop_ladder(
                process,
                graceful=quit_was_sent,
                timeout=self._stop_timeout,
                kill_timeout=30.0,
                what="qemu-storage-daemon",
                log=logger,
            ):
                raise QemuStorageDaemonError(f"qemu-storage-daemon pid {process.pid} survived SIGKILL")
            await process.aclose()  # reaped already; lets the stderr reader finish
            if self._exit_task is not None:
                await self._exit_task
        self._process = None
        self._exit_task = None
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()
        if self._runtime_dir is not None:
            remove_owned_dir(self._runtime_dir)
        self._socket_path = None
        self._runtime_dir = None

    # ------------------------------------------------------------------ QMP

    def _require_running(self, *, draining: bool = False) -> QMPClient:
        """The QMP client, if commands may be sent now.

        ``draining``: the command belongs to an operation already under way, which stop()
        lets finish; new operations need the daemon RUNNING.
        """
        state = self.state
        allowed = (DaemonState.RUNNING, DaemonState.STOPPING) if draining else (DaemonState.RUNNING,)
        if state not in allowed or self._qmp is None or self._exited():
            if state is DaemonState.FAILED:
                raise self._died_error("daemon")
            raise QemuStorageDaemonError(f"qemu-storage-daemon is not started (state: {state})")
        return self._qmp

    def _died_error(self, during: str) -> QemuStorageDaemonError:
        if self._state in (DaemonState.STOPPING, DaemonState.STOPPED):
            return QemuStorageDaemonError(f"qemu-storage-daemon was stopped during {during}")
        code = self._process.returncode if self._process is not None else None
        return QemuStorageDaemonError(
            f"qemu-storage-daemon died (exit code {code}) during {during}; "
            f"stderr: {self.stderr_tail() or '(empty)'}; call start() to launch a new one",
            context={"exit_code": code, "stderr": self.stderr_tail()},
        )

    async def _execute(self, cmd: str, args: Mapping[str, object] | None = None) -> object:
        qmp = self._require_running(draining=True)
        try:
            async with asyncio.timeout(self._command_timeout):
                return await qmp.execute(cmd, args)
        except ExecuteError as exc:
            raise QemuStorageDaemonError(
                f"QMP {cmd} failed: {exc}",
                error_class=exc.error_class,
                context={"command": cmd, "arguments": dict(args or {})},
            ) from exc
        except TimeoutError as exc:
            raise QemuStorageDaemonError(
                f"QMP {cmd} got no answer within {self._command_timeout}s", context={"command": cmd}
            ) from exc
        except Exception as exc:  # connection lost, protocol error
            if self._exited():
                raise self._died_error(f"QMP {cmd}") from exc
            raise QemuStorageDaemonError(f"QMP {cmd} failed: {exc!r}", context={"command": cmd}) from exc

    async def _wait_concluded(self, listener: EventListener, job_id: str) -> None:
        """Wait for JOB_STATUS_CHANGE(concluded) of ``job_id``, or the daemon's death, or the timeout."""
        exit_task = self._exit_task  # captured: stop() clears the attribute
        if exit_task is None:
            raise self._died_error(f"job {job_id}")
        async with asyncio.timeout(self._command_timeout):
            while True:
                getter = asyncio.ensure_future(listener.get())
                try:
                    await asyncio.wait({getter, exit_task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await getter
                if not getter.done() or getter.cancelled():
                    raise self._died_error(f"job {job_id}")
                if _event_data(getter.result()).get("status") == "concluded":
                    return

    async def _run_create_job(self, job_id: str, options: dict[str, Any], issued: list[str]) -> None:
        qmp = self._require_running(draining=True)
        listener = EventListener(
            "JOB_STATUS_CHANGE", event_filter=lambda ev: _event_data(ev).get("id") == job_id
        )
        with qmp.listen(listener):
            issued.append(job_id)
            await self._execute("blockdev-create", {"job-id": job_id, "options": options})
            try:
                await self._wait_concluded(listener, job_id)
            except TimeoutError as exc:
                raise QemuStorageDaemonError(
                    f"blockdev-create job {job_id} did not finish within {self._command_timeout}s",
                    context={"job_id": job_id},
                ) from exc
        error = await self._job_error(job_id)
        await self._execute("job-dismiss", {"id": job_id})
        issued.remove(job_id)
        if error is not None:
            target = options.get("filename") or options.get("file")
            raise QemuStorageDaemonError(
                f"blockdev-create ({options['driver']}) failed for {target}: {error}",
                context={"job_id": job_id, "job_error": error},
            )

    async def _job_error(self, job_id: str) -> str | None:
        jobs = await self._execute("query-jobs")
        for job in jobs if isinstance(jobs, list) else []:
            if isinstance(job, dict) and job.get("id") == job_id:
                error = job.get("error")
                return str(error) if error is not None else None
        raise QemuStorageDaemonError(f"blockdev-create job {job_id} vanished", context={"job_id": job_id})

    # ------------------------------------------------------------------ overlays

    async def create_overlay(self, base: Path, overlay: Path, *, size: int | None = None) -> None:
        """Create ``overlay``: a qcow2 whose backing file is ``base`` (absolute, symlinks kept).

        ``size`` defaults to the base's virtual size. The base must be qcow2 and
        ``overlay`` must not exist. On any failure (or cancellation) nothing is left
        behind: jobs are dismissed, nodes deleted and the partial file removed.
        """
        self._require_running()
        base, overlay = absolute_path(base), absolute_path(overlay)
        info = await get_image_info(base, qemu_img=self._qemu_img, timeout=self._command_timeout)
        ensure_qcow2(base, info)
        virtual_size = overlay_size(base, info, size)
        refuse_existing(overlay)

        async with self._command_lock:
            self._require_running()  # stop() may have begun while we queued
            suffix = uuid.uuid4().hex[:12]
            node = f"esb{suffix}"
            issued_jobs: list[str] = []
            node_added = False
            try:
                await self._run_create_job(
                    f"esb-file-{suffix}", build_file_create_options(overlay), issued_jobs
                )
                node_added = True  # set before the call: a cancelled blockdev-add may still have happened
                await self._execute(
                    "blockdev-add", {"driver": "file", "node-name": node, "filename": str(overlay)}
                )
                await self._run_create_job(
                    f"esb-qcow2-{suffix}", build_qcow2_create_options(node, virtual_size, base), issued_jobs
                )
                await self._execute("blockdev-del", {"node-name": node})
            except BaseException:
                # The overlay did not exist before (checked above), so whatever is there is ours.
                await shielded(self._undo(overlay, node if node_added else None, issued_jobs))
                raise

    async def _undo(self, overlay: Path, node: str | None, jobs: list[str]) -> None:
        """Best effort: every step is attempted even if earlier ones fail."""
        if not self._exited():
            for job_id in jobs:
                with contextlib.suppress(Exception):
                    await self._settle_job(job_id)
            if node is not None:
                with contextlib.suppress(QemuStorageDaemonError):
                    await self._execute("blockdev-del", {"node-name": node})
        remove_partial(overlay)

    async def _settle_job(self, job_id: str) -> None:
        """Wait for an abandoned job to conclude, then dismiss it (a running job pins its node)."""
        async with asyncio.timeout(self._command_timeout):
            while True:
                jobs = await self._execute("query-jobs")
                job = next(
                    (
                        j
                        for j in (jobs if isinstance(jobs, list) else [])
                        if isinstance(j, dict) and j.get("id") == job_id
                    ),
                    None,
                )
                if job is None:
                    return
                if job.get("status") == "concluded":
                    await self._execute("job-dismiss", {"id": job_id})
                    return
                await asyncio.sleep(0.005)
