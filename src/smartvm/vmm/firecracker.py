"""FirecrackerMachine: one ``firecracker`` process driven over its HTTP API socket.

Lifecycle (guarded by :class:`FirecrackerState`)::

    NEW --start()/load_snapshot()--> STARTING --> RUNNING <--pause()/resume()--> PAUSED
      any state --stop()--> STOPPED          failure during start --> FAILED (already cleaned up)

Every host-side effect registers its undo when it is made (API socket file,
log/metrics FIFOs and their drains, the process itself, the HTTP client); undo
runs in reverse, once, on ``stop()`` or on any failure or cancellation of
``start()``/``load_snapshot()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import stat
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from smartvm.cleanup import UndoStack, UndoStep
from smartvm.config import VMConfig, boot_configuration_steps, instance_start_step
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.process import ChildProcess, run_tool, stop_ladder
from smartvm.transport.socket_client import SocketClient
from smartvm.vmm.base import NetworkOverride, SnapshotFiles, VmmInfo, VmmRunState

__all__ = [
    "MIN_FIRECRACKER_VERSION",
    "FirecrackerMachine",
    "FirecrackerState",
    "build_firecracker_argv",
    "build_snapshot_load_payload",
    "parse_firecracker_version",
    "probe_firecracker_version",
]

_log = logging.getLogger(__name__)

MIN_FIRECRACKER_VERSION: tuple[int, int, int] = (1, 16, 1)
"""The API version our payloads are written and tested against."""

_VERSION_RE = re.compile(r"\bv?(\d+)\.(\d+)\.(\d+)\b")
_INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_MAX_SOCKET_PATH = 107


class FirecrackerState(StrEnum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"


# ---------------------------------------------------------------- pure builders


def build_firecracker_argv(binary: str, socket_path: Path, instance_id: str | None = None) -> list[str]:
    argv = [binary, "--api-sock", str(socket_path)]
    if instance_id is not None:
        argv += ["--id", instance_id]
    return argv


def parse_firecracker_version(text: str) -> tuple[int, int, int] | None:
    """``"Firecracker v1.16.1\\n..."`` -> ``(1, 16, 1)``; None when no version is found."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    match = _VERSION_RE.search(first) or _VERSION_RE.search(text)
    if match is None:
        return None
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def build_snapshot_load_payload(
    files: SnapshotFiles,
    *,
    resume: bool,
    network_overrides: list[NetworkOverride] | None = None,
    vsock_uds_path: str | None = None,
) -> dict[str, Any]:
    """Body of ``PUT /snapshot/load`` (``mem_backend``, not the deprecated ``mem_file_path``)."""
    payload: dict[str, Any] = {
        "snapshot_path": str(files.snapshot_path),
        "mem_backend": {"backend_type": "File", "backend_path": str(files.mem_file_path)},
        "resume_vm": resume,
    }
    if network_overrides:
        payload["network_overrides"] = [
            {"iface_id": o.iface_id, "host_dev_name": o.host_dev_name} for o in network_overrides
        ]
    if vsock_uds_path is not None:
        payload["vsock_override"] = {"uds_path": vsock_uds_path}
    return payload


async def probe_firecracker_version(binary: str, *, timeout: float = 10.0) -> tuple[int, int, int] | None:
    """Run ``firecracker --version``; None (and a warning) when the version cannot be determined."""
    try:
        result = await run_tool([binary, "--version"], timeout=timeout, merge_stderr=True)
    except TimeoutError:
        raise  # an OSError too, but not a missing binary
    except OSError as exc:
        raise SmartVMError(
            ErrorCode.VMM_NOT_FOUND, f"cannot run {binary} --version: {exc}", details={"binary": binary}
        ) from exc
    version = parse_firecracker_version(result.stdout.decode(errors="replace"))
    if version is None:
        _log.warning("could not determine the version of %s (exit %s)", binary, result.returncode)
    elif version < MIN_FIRECRACKER_VERSION:
        _log.warning(
            "%s is Firecracker %s, older than %s which smartvm is written against; some API calls may fail",
            binary,
            ".".join(map(str, version)),
            ".".join(map(str, MIN_FIRECRACKER_VERSION)),
        )
    return version


def _resolve_binary(binary_path: str | Path) -> str:
    text = str(binary_path)
    found = shutil.which(text) if os.sep not in text else (text if os.access(text, os.X_OK) else None)
    if found is None or not os.path.isfile(found):
        raise SmartVMError(
            ErrorCode.VMM_NOT_FOUND,
            f"firecracker binary not found or not executable: {text}",
            details={"binary": text},
        )
    return found


def _require_snapshot_files(files: SnapshotFiles) -> None:
    for what, path in (("snapshot", files.snapshot_path), ("memory", files.mem_file_path)):
        if not os.path.isfile(path):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"{what} file does not exist: {path}",
                details={"path": str(path)},
            )


class _FifoDrain:
    """Creates a FIFO for Firecracker's log/metrics and forwards what it writes to Python logging."""

    def __init__(self, path: Path, logger: logging.Logger) -> None:
        self.path = path
        self._logger = logger
        self._fd: int | None = None
        self._buffer = b""

    def open(self) -> None:
        os.mkfifo(self.path, 0o600)
        try:
            # O_RDWR keeps a writer attached, so the FIFO never reports EOF before Firecracker opens it.
            self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
            asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        except BaseException:
            self.close()
            raise

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._logger.debug("%s", line.decode(errors="replace"))

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# ---------------------------------------------------------------- the machine


class FirecrackerMachine:
    """A :class:`~smartvm.vmm.base.VmmBackend` for one ``firecracker`` process."""

    def __init__(
        self,
        binary_path: str | Path,
        socket_path: str | Path,
        *,
        instance_id: str | None = None,
        socket_timeout: float = 5.0,
        api_timeout: float = 5.0,
        snapshot_timeout: float = 120.0,
        check_version: bool = True,
    ) -> None:
        self._binary_path = str(binary_path)
        self._socket_path = Path(socket_path)
        if not str(binary_path):
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "binary_path must not be empty")
        if len(str(self._socket_path).encode()) > _MAX_SOCKET_PATH:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"socket_path is longer than {_MAX_SOCKET_PATH} bytes (AF_UNIX limit): {self._socket_path}",
                details={"socket_path": str(self._socket_path)},
            )
        if instance_id is not None and not _INSTANCE_ID_RE.match(instance_id):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"instance_id {instance_id!r} must be 1-64 characters of [A-Za-z0-9-] "
                "(Firecracker's --id rule)",
            )
        if min(socket_timeout, api_timeout, snapshot_timeout) <= 0:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "timeouts must be positive")
        self._instance_id = instance_id
        self._socket_timeout = socket_timeout
        self._api_timeout = api_timeout
        self._snapshot_timeout = snapshot_timeout
        self._check_version = check_version
        self._state = FirecrackerState.NEW
        self._proc: ChildProcess | None = None
        self._client: SocketClient | None = None
        self._undo = UndoStack(f"firecracker {self._socket_path}", log=_log)
        self._version: tuple[int, int, int] | None = None
        self._last_exit_code: int | None = None

    # ---- VmmBackend properties

    @property
    def name(self) -> str:
        return "firecracker"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.alive else None

    @property
    def state(self) -> FirecrackerState:
        return self._state

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    @property
    def client(self) -> SocketClient | None:
        return self._client

    @property
    def version(self) -> tuple[int, int, int] | None:
        """What ``firecracker --version`` said, once started (None if unknown or not checked)."""
        return self._version

    def stderr_tail(self) -> str:
        return self._proc.stderr_tail() if self._proc is not None else ""

    def console_tail(self) -> str:
        """The last lines the VMM wrote to stdout (the guest serial console, unless configured away)."""
        return self._proc.stdout_tail() if self._proc is not None else ""

    # ---- guards

    def _require(self, *allowed: FirecrackerState, action: str) -> None:
        if self._state not in allowed:
            raise SmartVMError(
                ErrorCode.INVALID_STATE,
                f"cannot {action} a Firecracker machine in state {self._state.value!r}",
                details={"state": self._state.value, "allowed": [s.value for s in allowed]},
            )

    def _api(self) -> SocketClient:
        if self._client is None:
            raise SmartVMError(ErrorCode.NO_CLIENT, "the Firecracker process has not been started")
        return self._client

    # ---- start / load

    async def start(self, config: VMConfig) -> None:
        """Spawn Firecracker, run the ordered configuration steps, then ``InstanceStart``."""
        self._require(FirecrackerState.NEW, action="start")
        # Pure, and validates the config: a bad config never spawns anything.
        steps = [*boot_configuration_steps(config), instance_start_step()]
        self._state = FirecrackerState.STARTING
        try:
            client = await self._launch(config)
            for step in steps:
                await self._configure_step(client, step.name, step.method, step.path, step.body)
        except BaseException:
            await self._abort()
            raise
        self._state = FirecrackerState.RUNNING

    async def load_snapshot(
        self,
        files: SnapshotFiles,
        *,
        resume: bool = True,
        network_overrides: list[NetworkOverride] | None = None,
        vsock_uds_path: str | None = None,
    ) -> None:
        """Start a fresh Firecracker and load ``files`` into it (``PUT /snapshot/load``)."""
        self._require(FirecrackerState.NEW, action="load a snapshot into")
        _require_snapshot_files(files)
        payload = build_snapshot_load_payload(
            files, resume=resume, network_overrides=network_overrides, vsock_uds_path=vsock_uds_path
        )
        self._state = FirecrackerState.STARTING
        try:
            client = await self._launch(None)
            try:
                await client.put("/snapshot/load", payload, timeout=self._snapshot_timeout)
            except SmartVMError as exc:
                raise self._snapshot_error("load", exc, files) from exc
        except BaseException:
            await self._abort()
            raise
        self._state = FirecrackerState.RUNNING if resume else FirecrackerState.PAUSED

    async def _launch(self, config: VMConfig | None) -> SocketClient:
        binary = _resolve_binary(self._binary_path)
        self._prepare_socket_path()
        if self._check_version:
            self._version = await probe_firecracker_version(binary)
        # Registered before spawning: Firecracker creates the socket, but only we remove it.
        self._push_undo("remove API socket", self._remove_socket)
        if config is not None:
            self._create_fifos(config)
        argv = build_firecracker_argv(binary, self._socket_path, self._instance_id)
        try:
            proc = await ChildProcess.spawn(argv)
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.VMM_START_FAILED,
                f"cannot spawn {binary}: {exc}",
                details={"argv": argv},
                retryable=True,
            ) from exc
        self._proc = proc
        self._push_undo("kill firecracker", self._kill_process)
        client = SocketClient(
            self._socket_path, timeout=self._api_timeout, long_timeout=self._snapshot_timeout
        )
        self._client = client
        self._push_undo("close API client", client.aclose)
        await self._wait_for_socket(proc, client)
        return client

    def _prepare_socket_path(self) -> None:
        parent = self._socket_path.parent
        if not parent.is_dir():
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"directory of the API socket does not exist: {parent}",
                details={"socket_path": str(self._socket_path)},
            )
        try:
            mode = self._socket_path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"API socket path exists and is not a socket: {self._socket_path}",
                details={"socket_path": str(self._socket_path)},
            )
        raise SmartVMError(
            ErrorCode.VMM_START_FAILED,
            f"API socket {self._socket_path} already exists (another VMM, or a stale socket): "
            "remove it first",
            details={"socket_path": str(self._socket_path)},
            retryable=True,
        )

    def _create_fifos(self, config: VMConfig) -> None:
        model = config.config
        wanted: list[tuple[str, str | None]] = [
            ("log", model.logger.log_path if model.logger is not None else None),
            ("metrics", model.metrics.metrics_path if model.metrics is not None else None),
        ]
        for kind, path_text in wanted:
            if not path_text or os.path.lexists(path_text):
                continue  # an existing file/FIFO belongs to the caller
            drain = _FifoDrain(Path(path_text), logging.getLogger(f"{__name__}.{kind}"))
            try:
                drain.open()
            except OSError as exc:
                raise SmartVMError(
                    ErrorCode.VMM_START_FAILED,
                    f"cannot create the {kind} FIFO {path_text}: {exc}",
                    details={"path": path_text},
                    retryable=True,
                ) from exc
            self._push_undo(f"remove {kind} FIFO", _async(drain.close))

    async def _wait_for_socket(self, proc: ChildProcess, client: SocketClient) -> None:
        ready = asyncio.create_task(client.wait_for_socket(self._socket_timeout))
        exited = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ready, exited):
                task.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            return
        if exited.done() and not exited.cancelled():
            raise SmartVMError(
                ErrorCode.VMM_EXITED,
                f"firecracker exited with code {proc.returncode} before its API socket was ready",
                details={"exit_code": proc.returncode, "stderr": proc.stderr_tail(), "argv": proc.argv},
            )
        error = ready.exception() if ready.done() and not ready.cancelled() else None
        raise SmartVMError(
            ErrorCode.SOCKET_TIMEOUT,
            f"firecracker API socket {self._socket_path} did not appear within {self._socket_timeout:g}s",
            details={"socket_path": str(self._socket_path), "stderr": proc.stderr_tail(), "argv": proc.argv},
        ) from error

    async def _configure_step(
        self, client: SocketClient, name: str, method: str, path: str, body: Any
    ) -> None:
        try:
            await client.request(method, path, body)
        except SmartVMError as exc:
            proc = self._proc
            details = {**exc.details, "step": name}
            if proc is not None:
                await proc.wait(0.05)  # let an exit that caused the failure be seen
                details["stderr"] = proc.stderr_tail()
                if not proc.alive:
                    details["exit_code"] = proc.returncode
            raise SmartVMError(
                exc.code,
                f"configuration step {name!r} ({method} {path}) failed: {exc.message}",
                status_code=exc.status_code,
                fault_message=exc.fault_message,
                details=details,
                retryable=exc.retryable,
            ) from exc

    # ---- running VM

    async def pause(self) -> None:
        self._require(FirecrackerState.RUNNING, FirecrackerState.PAUSED, action="pause")
        await self._api().patch("/vm", {"state": "Paused"})
        self._state = FirecrackerState.PAUSED

    async def resume(self) -> None:
        self._require(FirecrackerState.RUNNING, FirecrackerState.PAUSED, action="resume")
        await self._api().patch("/vm", {"state": "Resumed"})
        self._state = FirecrackerState.RUNNING

    async def create_snapshot(self, files: SnapshotFiles, *, snapshot_type: str = "Full") -> None:
        """``PUT /snapshot/create`` with the long timeout. Paused VMs only; partial files are removed."""
        self._require(FirecrackerState.PAUSED, action="snapshot")
        if snapshot_type not in ("Full", "Diff"):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"snapshot_type must be Full or Diff, not {snapshot_type!r}"
            )
        targets = [Path(files.snapshot_path), Path(files.mem_file_path)]
        for target in targets:
            if not target.parent.is_dir():
                raise SmartVMError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"directory for snapshot file does not exist: {target.parent}",
                    details={"path": str(target)},
                )
        preexisting = {t for t in targets if t.exists()}
        body = {
            "snapshot_path": str(files.snapshot_path),
            "mem_file_path": str(files.mem_file_path),
            "snapshot_type": snapshot_type,
        }
        try:
            await self._api().put("/snapshot/create", body, timeout=self._snapshot_timeout)
        except BaseException as exc:
            for target in targets:
                if target not in preexisting:
                    with contextlib.suppress(FileNotFoundError):
                        target.unlink()
            if isinstance(exc, SmartVMError):
                raise self._snapshot_error("create", exc, files) from exc
            raise

    @staticmethod
    def _snapshot_error(action: str, exc: SmartVMError, files: SnapshotFiles) -> SmartVMError:
        return SmartVMError(
            ErrorCode.SNAPSHOT_FAILED,
            f"snapshot {action} failed: {exc.message}",
            status_code=exc.status_code,
            fault_message=exc.fault_message,
            details={
                **exc.details,
                "cause": exc.code,
                "snapshot_path": str(files.snapshot_path),
                "mem_file_path": str(files.mem_file_path),
            },
        )

    async def get_info(self) -> VmmInfo:
        client = self._api()
        proc = self._proc
        if proc is None or not proc.alive:
            raise SmartVMError(
                ErrorCode.VMM_EXITED,
                "the Firecracker process is not running",
                details={"exit_code": proc.returncode if proc is not None else None},
            )
        info = await client.get("/")
        version = await client.get("/version")
        return VmmInfo(
            id=str(info["id"]),
            state=VmmRunState(info["state"]),
            vmm="firecracker",
            vmm_version=str(info["vmm_version"]),
            pid=proc.pid,
            accelerator="kvm",
            extra={
                "app_name": info.get("app_name"),
                "firecracker_version": version.get("firecracker_version"),
                "socket_path": str(self._socket_path),
            },
        )

    # ---- shutdown

    async def stop(self, *, timeout: float = 5.0) -> None:
        """SendCtrlAltDel -> SIGTERM -> SIGKILL (``timeout`` each), then undo everything. Idempotent."""
        if self._state is FirecrackerState.STOPPED:
            return
        proc = self._proc
        try:
            if proc is not None and proc.alive:
                await self._shutdown_ladder(proc, timeout)
        finally:
            await self._run_undo()
            self._state = FirecrackerState.STOPPED

    async def _shutdown_ladder(self, proc: ChildProcess, timeout: float) -> None:
        async def ctrl_alt_del() -> bool:
            # A paused guest cannot react to Ctrl-Alt-Del; go straight to signals.
            if self._state is not FirecrackerState.RUNNING or self._client is None:
                return False
            try:
                await self._client.put(
                    "/actions", {"action_type": "SendCtrlAltDel"}, timeout=min(timeout, self._api_timeout)
                )
            except SmartVMError as exc:
                _log.debug("SendCtrlAltDel failed, escalating: %s", exc)
                return False
            return True

        await stop_ladder(proc, graceful=ctrl_alt_del, timeout=timeout, what="firecracker", log=_log)

    async def wait(self) -> int | None:
        proc = self._proc
        if proc is None:
            return self._last_exit_code
        return await proc.wait()

    async def _abort(self) -> None:
        # Start failed or was cancelled: no graceful shutdown for a VM that never came up.
        try:
            await self._run_undo()
        finally:
            self._state = FirecrackerState.FAILED

    def _push_undo(self, name: str, action: UndoStep) -> None:
        self._undo.push(name, action)

    async def _run_undo(self) -> None:
        """Run every registered undo in reverse, once; a cancelled step does not stop the rest."""
        failures = await self._undo.run()
        if failures:
            raise SmartVMError(
                ErrorCode.STOP_FAILED, "cleanup incomplete: " + "; ".join(f"{n}: {e}" for n, e in failures)
            )

    async def _kill_process(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._last_exit_code = await proc.aclose()

    async def _remove_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._socket_path.unlink()

    async def __aenter__(self) -> FirecrackerMachine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"FirecrackerMachine(socket_path={str(self._socket_path)!r}, state={self._state.value!r})"


def _async(func: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        func()

    return run
