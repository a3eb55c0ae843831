"""``QemuMachine``: one QEMU ``-M microvm`` process behind the :class:`~smartvm.vmm.base.VmmBackend` protocol.

Lifecycle (a :class:`MachineState` guards every call)::

    NEW --start()/load_snapshot()--> STARTING --> RUNNING <--pause()/resume()--> PAUSED
      any live state --stop()--> STOPPING --> STOPPED
      QEMU exits by itself --> EXITED (exit code 0, e.g. guest ``reboot -f``) | FAILED

Every host-side effect registers its undo when made (VM directory, owner record, RAM file,
process); ``stop()`` and any failure or cancellation during start run them in reverse, once.
Shutdown ladder: QMP ``quit`` -> SIGTERM -> SIGKILL (to QEMU's own process group).

Snapshots (QEMU 7.2 has no ``file:`` migration URI):

* save: guest paused -> ``migrate exec:cat > FILE`` (device state; with ``shared_memory`` and
  ``x-ignore-shared`` the RAM is not streamed) -> the RAM file is copied to ``mem_file_path``
  so the snapshot stays pristine while this VM runs on. A sidecar ``<snapshot>.qemu.json``
  stores the machine spec so a fresh :class:`QemuMachine` can restore without being told.
  Without ``shared_memory`` the RAM is streamed into the snapshot file (``mem_file_path`` unused).
* restore: a fresh process with ``-incoming defer`` and the RAM file mapped ``share=off``
  (private copy-on-write: many clones restore from one file) -> ``migrate-incoming exec:cat FILE``
  -> ``cont`` when ``resume``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from smartvm.cleanup import UndoStack, UndoStep, shielded
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.hostfs import atomic_write_file, ensure_private_dir, private_file
from smartvm.leftovers import (
    OwnerRecord,
    private_runtime_dir,
    private_shm_dir,
    process_start_ticks,
    reap_leftovers,
    write_owner_record,
)
from smartvm.process import ChildProcess, set_process_nice, stop_ladder
from smartvm.qemu.accel import AccelChoice, choose_accelerator
from smartvm.qemu.argv import (
    ARCH_PROFILES,
    MemoryBackendSpec,
    QemuMachineSpec,
    SerialPortSpec,
    SupportsVMConfig,
    UserNetSpec,
    build_argv,
    build_env,
    exec_uri,
    spec_from_vmconfig,
    with_host_tsc,
)
from smartvm.qemu.console import ConsoleBuffer
from smartvm.qemu.qmp import QmpConnection
from smartvm.vmm.base import NetworkOverride, SnapshotFiles, VmmInfo, VmmRunState

if TYPE_CHECKING:
    from smartvm.config.models import VMConfigModel

__all__ = ["SNAPSHOT_SIDECAR_SUFFIX", "MachineState", "QemuMachine"]

log = logging.getLogger(__name__)

SNAPSHOT_SIDECAR_SUFFIX = ".qemu.json"
_SOCKET_PATH_MAX = 107
_STDERR_TAIL = 4096
_MIGRATION_BANDWIDTH = 1 << 40  # bytes/s: lift QEMU's 32 MiB/s default cap


class MachineState(StrEnum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXITED = "exited"
    FAILED = "failed"


_LIVE = (MachineState.RUNNING, MachineState.PAUSED)


def _sidecar(snapshot_path: Path) -> Path:
    return snapshot_path.with_name(snapshot_path.name + SNAPSHOT_SIDECAR_SUFFIX)


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).absolute()


def _is_file(path: Path) -> bool:
    return path.is_file()


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to the new private file ``dst`` (0600, ``O_EXCL|O_NOFOLLOW``) keeping holes:
    guest RAM files are mostly untouched pages."""
    chunk = 1 << 20
    with open(src, "rb") as fin, private_file(dst) as fout:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            fin.seek(start)
            fout.seek(start)
            remaining = end - start
            while remaining > 0:
                data = fin.read(min(chunk, remaining))
                if not data:
                    break
                fout.write(data)
                remaining -= len(data)
            offset = end
        fout.truncate(size)


def _cpu_khz() -> int:
    # TCG's guest TSC ticks at the host TSC rate; "cpu MHz" is close enough for the boot hint.
    with contextlib.suppress(OSError):
        match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return int(float(match.group(1)) * 1000)
    return 2_600_000



_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/<pid>/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
        fields = raw[raw.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None

class QemuMachine:
    """One QEMU microVM. Implements :class:`~smartvm.vmm.base.VmmBackend`.

    ``spec``: what to boot (or pass a ``VMConfig`` to :meth:`start`). ``accel``: ``"kvm"``/``"tcg"``
    to force, None to probe (``$SMARTVM_ACCEL`` also forces). ``serial_ports``: virtio-serial port
    names; their sockets live in the VM directory (:meth:`serial_socket`). ``shared_memory``: keep
    guest RAM in a /dev/shm file so snapshots skip streaming RAM. ``user_net``: slirp networking.
    ``acpi``: for a ``VMConfig`` boot, turn microvm's ACPI on (kernels with modular virtio drivers).
    ``runtime_dir``: default :func:`smartvm.leftovers.private_runtime_dir`; either way it is created
    0700 and verified (ours, not a symlink) before use. ``shm_dir``: where the RAM file goes (default
    :func:`smartvm.leftovers.private_shm_dir`, ``/dev/shm/smartvm-<uid>``), verified the same way.
    Everything QEMU creates (RAM file, snapshot files, sockets) is made under umask 077.
    """

    def __init__(
        self,
        spec: QemuMachineSpec | None = None,
        *,
        vm_id: str | None = None,
        binary: str | None = None,
        runtime_dir: Path | None = None,
        accel: str | None = None,
        serial_ports: Sequence[str] = (),
        user_net: UserNetSpec | None = None,
        shared_memory: bool = False,
        acpi: bool = False,
        shm_dir: Path | None = None,
        console_limit: int = 64 * 1024,
        start_timeout: float = 30.0,
        nice: int = 0,
    ) -> None:
        self.vm_id = vm_id or uuid.uuid4().hex[:12]
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.vm_id):
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"invalid vm_id {self.vm_id!r}")
        self._spec = spec
        self._binary = binary
        self.runtime_dir = (runtime_dir or private_runtime_dir()).absolute()
        self.vm_dir = self.runtime_dir / self.vm_id
        self._accel_override = accel
        self._serial_names = tuple(serial_ports)
        self._nice = nice  # QEMU starts at this nice value (a background VM: see set_nice)
        self._user_net = user_net
        self._shared_memory = shared_memory
        self._acpi = acpi
        self._shm_dir = shm_dir
        self._start_timeout = start_timeout
        self.console = ConsoleBuffer(console_limit)
        self._stderr = ConsoleBuffer(_STDERR_TAIL)
        self._state = MachineState.NEW
        self._accel: AccelChoice | None = None
        self._proc: ChildProcess | None = None
        self._qmp: QmpConnection | None = None
        self._watcher: asyncio.Task[int] | None = None
        self._undo = UndoStack(f"QEMU VM {self.vm_id}", log=log)
        self._lock = asyncio.Lock()
        self._exit_code: int | None = None
        self._version: str = ""
        self._record: OwnerRecord | None = None
        self.argv: list[str] = []
        self.spec: QemuMachineSpec | None = None  # the resolved spec of the running process

    # --- introspection ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return "qemu"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system, all threads: vCPUs, I/O, TCG) the QEMU process has used so far,
        read from ``/proc/<pid>/stat``; None unless it is running or paused."""
        pid = self.pid
        if pid is None or self._state.value not in ("running", "paused"):
            return None
        return process_cpu_seconds(pid)

    @property
    def state(self) -> MachineState:
        return self._state

    @property
    def accelerator(self) -> AccelChoice | None:
        return self._accel

    @property
    def exit_code(self) -> int | None:
        return self._exit_code

    def console_output(self) -> str:
        return self.console.output()

    def stderr_tail(self) -> str:
        return self._stderr.output()

    def serial_socket(self, name: str) -> Path:
        """Host path of the unix socket behind virtio-serial port ``name``."""
        if name not in self._serial_names:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"no virtio-serial port named {name!r}")
        return self.vm_dir / f"port-{self._serial_names.index(name)}.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.vm_dir / "qmp.sock"

    def _require(self, *states: MachineState, action: str) -> None:
        if self._state not in states:
            raise SmartVMError(
                ErrorCode.INVALID_STATE,
                f"cannot {action} QEMU VM {self.vm_id} in state {self._state.value!r}",
                details={"state": self._state.value, "vm_id": self.vm_id},
            )

    # --- start --------------------------------------------------------------------------

    async def __aenter__(self) -> QemuMachine:
        """Start the constructor's spec (if any); without one, call start/load_snapshot inside."""
        if self._spec is not None and self._state == MachineState.NEW:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, config: SupportsVMConfig | VMConfigModel | None = None) -> None:
        """Boot the guest from ``config`` (Firecracker-style) or the constructor's spec. Twice: no-op."""
        async with self._lock:
            if self._state in (MachineState.STARTING, *_LIVE):
                return
            self._require(MachineState.NEW, action="start")
            self._accel = choose_accelerator(self._accel_override)
            if config is not None:
                ensure_valid = getattr(config, "ensure_valid", None)
                if callable(ensure_valid):  # smartvm.config.VMConfig: same rules as Firecracker
                    ensure_valid()
                spec = spec_from_vmconfig(
                    config, accel=self._accel.accel, tsc_khz=_cpu_khz(), acpi=self._acpi
                )
            elif self._spec is not None:
                spec = self._spec
            else:
                raise SmartVMError(ErrorCode.INVALID_CONFIG, "QemuMachine.start needs a config or a spec")
            await self._launch(spec, incoming=False)

    async def _launch(self, spec: QemuMachineSpec, *, incoming: bool) -> None:
        """Spawn QEMU for ``spec`` and connect QMP; undo everything on failure or cancellation."""
        assert self._accel is not None
        self._state = MachineState.STARTING
        try:
            spec = self._resolve(spec, incoming=incoming)
            self._check_inputs(spec)
            binary = self._binary or ARCH_PROFILES[spec.arch].binary
            if shutil.which(binary) is None:
                raise SmartVMError(
                    ErrorCode.VMM_NOT_FOUND, f"QEMU binary not found: {binary}", details={"binary": binary}
                )
            await asyncio.to_thread(self._verify_runtime_dir)
            await asyncio.to_thread(reap_leftovers, self.runtime_dir)
            self._make_vm_dir(spec)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                spec = spec.model_copy(update={"qmp_fd": theirs.fileno()})
                self.spec = spec
                self.argv = build_argv(spec, binary=binary)
                await self._spawn(spec, pass_fds=(theirs.fileno(),))
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()  # QEMU holds its end now; EOF on ours means it is gone
            await self._connect_qmp(ours)
            version = await self._qmp_exec("query-version")
            qemu = version.get("qemu", {}) if isinstance(version, dict) else {}
            self._version = f"{qemu.get('major', '?')}.{qemu.get('minor', '?')}.{qemu.get('micro', '?')}"
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch_exit(), name=f"qemu-exit-{self.vm_id}"
            )
            self._state = MachineState.PAUSED if incoming else MachineState.RUNNING
            log.info("QEMU VM %s started (pid %s, %s)", self.vm_id, self.pid, self._accel.accel)
        except BaseException:
            await shielded(self._teardown(graceful=False))
            self._state = MachineState.FAILED
            raise

    def _verify_runtime_dir(self) -> None:
        ensure_private_dir(self.runtime_dir)  # UnsafePathError (code UNSAFE_PATH) when it is not ours

    def _ram_file(self) -> Path:
        """This VM's guest-RAM file, in a verified private directory (0700, ours)."""
        directory = ensure_private_dir(self._shm_dir) if self._shm_dir is not None else private_shm_dir()
        return directory / f"smartvm-{self.vm_id}.ram"

    def _resolve(self, spec: QemuMachineSpec, *, incoming: bool) -> QemuMachineSpec:
        assert self._accel is not None
        update: dict[str, Any] = {
            "accel": self._accel.accel,
            "qmp_socket": self.qmp_socket,
            "console": True,
            "name": spec.name or f"smartvm-{self.vm_id}",
        }
        if self._serial_names:
            update["serial_ports"] = tuple(
                SerialPortSpec(name=n, socket_path=self.serial_socket(n)) for n in self._serial_names
            )
        if self._user_net is not None:
            update["user_net"] = self._user_net
        if not incoming:
            update["incoming"] = None
            if self._accel.accel == "tcg":
                # Under TCG the guest TSC runs at the host's rate: a baked-in rate from an image
                # bundle makes the APIC timer fail calibration and the guest tick 250 Hz on the PIT.
                update["cmdline"] = with_host_tsc(spec.cmdline, _cpu_khz())
            if self._shared_memory:
                mem = self._ram_file()
                update["memory_backend"] = MemoryBackendSpec(path=mem, share=True)
        else:
            update["incoming"] = "defer"
        for path in [
            self.qmp_socket,
            *(p.socket_path for p in update.get("serial_ports", spec.serial_ports)),
        ]:
            if len(str(path).encode()) > _SOCKET_PATH_MAX:
                raise SmartVMError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"unix socket path too long ({len(str(path))} > {_SOCKET_PATH_MAX}): {path}; "
                    "use a shorter runtime_dir",
                    details={"path": str(path)},
                )
        return spec.model_copy(update=update)

    @staticmethod
    def _check_inputs(spec: QemuMachineSpec) -> None:
        files = [("kernel image", spec.kernel)]
        if spec.initrd is not None:
            files.append(("initrd", spec.initrd))
        files += [(f"drive {d.id!r}", d.path) for d in spec.drives]
        if spec.incoming and spec.memory_backend is not None and not spec.memory_backend.share:
            files.append(("snapshot memory file", spec.memory_backend.path))
        for what, path in files:
            if not path.is_file():
                raise SmartVMError(
                    ErrorCode.INVALID_CONFIG,
                    f"{what} not found: {path}",
                    details={"path": str(path), "what": what},
                )

    def _make_vm_dir(self, spec: QemuMachineSpec) -> None:
        try:
            self.vm_dir.mkdir(mode=0o700, exist_ok=False)  # sockets inside: owner only
        except FileExistsError as exc:
            raise SmartVMError(
                ErrorCode.VM_ALREADY_EXISTS,
                f"a QEMU VM with id {self.vm_id!r} already exists in {self.runtime_dir}",
                details={"vm_id": self.vm_id, "path": str(self.vm_dir)},
            ) from exc
        self._push_undo("remove VM directory", self._remove_vm_dir)
        extra = []
        if spec.memory_backend is not None and spec.memory_backend.share:
            extra.append(str(spec.memory_backend.path))
            self._push_undo("remove RAM file", self._unlinker(spec.memory_backend.path))
        for port in spec.serial_ports:
            self._push_undo(f"remove socket {port.socket_path}", self._unlinker(port.socket_path))
        self._record = OwnerRecord(
            vm_id=self.vm_id,
            owner_pid=os.getpid(),
            owner_start=process_start_ticks(os.getpid()),
            marker=str(self.qmp_socket),
            extra_files=extra,
        )
        write_owner_record(self.vm_dir, self._record)

    async def _spawn(self, spec: QemuMachineSpec, *, pass_fds: Sequence[int] = ()) -> None:
        log.debug("spawning %s", " ".join(self.argv))
        try:
            # The console (QEMU's stdout) and stderr go to byte-bounded buffers that also serve waiters.
            # No THP (the TCG code buffer is MADV_HUGEPAGE: 2 MiB steps of RSS) and one malloc arena:
            # ~2-2.5 MiB less per idle VM, measured with bench/density.py.
            self._proc = await ChildProcess.spawn(
                self.argv,
                env=build_env(os.environ),
                new_session=True,
                stdout=self.console.attach,
                stderr=self._stderr.attach,
                thp_disable=True,
                nice=self._nice,
                pass_fds=pass_fds,
            )
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.VMM_START_FAILED,
                f"could not execute {self.argv[0]}: {exc}",
                details={"command": self.argv},
                retryable=True,
            ) from exc
        self._push_undo("stop QEMU process", self._kill_process)
        assert self._record is not None
        self._record.qemu_pid = self._proc.pid
        self._record.qemu_start = process_start_ticks(self._proc.pid)
        write_owner_record(self.vm_dir, self._record)

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.alive

    async def _connect_qmp(self, sock: socket.socket) -> None:
        self._qmp = QmpConnection(self.qmp_socket, name=f"smartvm-{self.vm_id}")
        self._push_undo("close QMP", self._qmp.close)
        try:
            await self._qmp.attach(sock, timeout=self._start_timeout)
        except SmartVMError as exc:
            raise await self._start_failure(str(exc)) from exc

    async def _start_failure(self, why: str) -> SmartVMError:
        if self._proc is not None:
            await self._proc.aclose()
        await self._stderr.wait_eof(timeout=1.0)
        tail = self._stderr.output().strip()
        return SmartVMError(
            ErrorCode.VMM_START_FAILED,
            f"QEMU failed to start (exit code {self._proc.returncode if self._proc else None}): "
            f"{tail.splitlines()[-1] if tail else why}",
            details={
                "command": self.argv,
                "stderr": tail,
                "exit_code": self._proc.returncode if self._proc else None,
            },
        )

    # --- exit watcher ---------------------------------------------------------------------

    async def _watch_exit(self) -> int:
        assert self._proc is not None
        code = await self._proc.wait()
        self._exit_code = code
        if self._state not in (MachineState.STOPPING, MachineState.STOPPED):
            self._state = MachineState.EXITED if code == 0 else MachineState.FAILED
            log.log(
                logging.INFO if code == 0 else logging.WARNING,
                "QEMU VM %s exited by itself with code %s: %s",
                self.vm_id,
                code,
                self._stderr.output().strip()[-300:] or "(no stderr)",
            )
        return code

    async def wait(self) -> int | None:
        """Wait for QEMU to exit; its exit code (None if never started)."""
        if self._proc is None:
            return None
        return await self._proc.wait()

    # --- QMP-backed operations ------------------------------------------------------------

    async def _qmp_exec(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self._qmp is None:
            raise SmartVMError(ErrorCode.NO_CLIENT, f"QEMU VM {self.vm_id} has no QMP connection")
        try:
            return await self._qmp.execute(command, arguments)
        except SmartVMError as exc:
            # "desc" marks a command QEMU refused; anything else is a broken link: did QEMU die?
            if "desc" in exc.details or self._proc is None:
                raise
            code = await self._proc.wait(1.0)
            if code is None:
                raise
            raise SmartVMError(
                ErrorCode.VMM_EXITED,
                f"QEMU VM {self.vm_id} exited (code {code}) during QMP {command}",
                details={"command": command, "exit_code": code, "stderr": self._stderr.output()[-1000:]},
            ) from exc

    async def execute_qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Escape hatch for QEMU-specific commands (e.g. ``query-migrate``)."""
        self._require(*_LIVE, action=f"run QMP {command} on")
        return await self._qmp_exec(command, arguments)

    async def pause(self) -> None:
        async with self._lock:
            self._require(*_LIVE, action="pause")
            await self._qmp_exec("stop")
            self._state = MachineState.PAUSED

    def set_nice(self, nice: int) -> bool:
        """Renice every QEMU thread (e.g. a VM made in the background, now serving a caller).
        False when QEMU is not running or raising priority is not allowed (CAP_SYS_NICE)."""
        pid = self.pid
        if pid is None or not set_process_nice(pid, nice):
            return False
        self._nice = nice
        return True

    async def resume(self) -> None:
        async with self._lock:
            self._require(*_LIVE, action="resume")
            await self._qmp_exec("cont")
            self._state = MachineState.RUNNING

    async def query_status(self) -> str:
        """QEMU's own run state (``running``, ``paused``, ``postmigrate``, ``inmigrate``, ...)."""
        self._require(*_LIVE, action="query")
        status = await self._qmp_exec("query-status")
        return str(status["status"])

    async def get_info(self) -> VmmInfo:
        extra: dict[str, Any] = {
            "machine_state": self._state.value,
            "accel_reason": self._accel.reason if self._accel else None,
        }
        state = VmmRunState.NOT_STARTED
        if self._state in _LIVE:
            status = await self.query_status()
            extra["qemu_status"] = status
            state = VmmRunState.RUNNING if status == "running" else VmmRunState.PAUSED
        elif self._exit_code is not None:
            extra["exit_code"] = self._exit_code
        return VmmInfo(
            id=self.vm_id,
            state=state,
            vmm="qemu",
            vmm_version=self._version,
            pid=self.pid if self._alive() else None,
            accelerator=self._accel.accel if self._accel else None,
            extra=extra,
        )

    # --- snapshots --------------------------------------------------------------------------

    async def _await_migration(self, *, incoming: bool) -> None:
        while True:
            info = await self._qmp_exec("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise SmartVMError(
                    ErrorCode.SNAPSHOT_FAILED,
                    f"{'restore' if incoming else 'snapshot'} migration {status}: "
                    f"{info.get('error-desc', '')}",
                    details={"migration": info, "stderr": self._stderr.output()[-1000:]},
                )
            if not self._alive():
                raise SmartVMError(
                    ErrorCode.VMM_EXITED,
                    f"QEMU exited during {'restore' if incoming else 'snapshot'}",
                    details={
                        "stderr": self._stderr.output()[-1000:],
                        "exit_code": self._proc.returncode if self._proc else None,
                    },
                )
            await asyncio.sleep(0.005)

    async def create_snapshot(self, files: SnapshotFiles, *, snapshot_type: str = "Full") -> None:
        """Save the paused VM: device state to ``snapshot_path``, RAM to ``mem_file_path``."""
        if snapshot_type != "Full":
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"QEMU supports only Full snapshots, not {snapshot_type!r}"
            )
        async with self._lock:
            self._require(MachineState.PAUSED, action="snapshot")
            assert self.spec is not None
            shared = self.spec.memory_backend is not None and self.spec.memory_backend.share
            snap = _absolute(files.snapshot_path)
            mem = _absolute(files.mem_file_path)
            snap.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Unpredictable names, made here (0600, O_EXCL|O_NOFOLLOW) so that `cat >` and the copy
            # write into files of ours, never through a symlink planted beside the target.
            tmp_snap = snap.with_name(f".{snap.name}.{secrets.token_hex(8)}.tmp")
            tmp_mem = mem.with_name(f".{mem.name}.{secrets.token_hex(8)}.tmp")
            try:
                with private_file(tmp_snap):
                    pass
                await self._qmp_exec("migrate-set-parameters", {"max-bandwidth": _MIGRATION_BANDWIDTH})
                await self._qmp_exec(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "x-ignore-shared", "state": shared}]},
                )
                await self._qmp_exec("migrate", {"uri": exec_uri("cat >", tmp_snap)})
                await self._await_migration(incoming=False)
                if shared:
                    assert self.spec.memory_backend is not None
                    mem.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    # The guest is paused, so the RAM file is stable while we copy it.
                    await asyncio.to_thread(_sparse_copy, self.spec.memory_backend.path, tmp_mem)
                    os.replace(tmp_mem, mem)
                os.replace(tmp_snap, snap)
                sidecar = {
                    "format": 1,
                    "ram": "file" if shared else "stream",
                    "spec": self.spec.model_dump(
                        mode="json",
                        exclude={
                            "qmp_socket", "qmp_fd", "incoming", "memory_backend", "serial_ports", "name"
                        },
                    ),
                    "serial_ports": list(self._serial_names),
                    # A streamed snapshot of a file-backed guest names its RAM block after the backend.
                    "memory_backend": self.spec.memory_backend is not None,
                }
                atomic_write_file(_sidecar(snap), json.dumps(sidecar, indent=1).encode())
            except BaseException:
                for leftover in (tmp_snap, tmp_mem):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
                raise
            log.info(
                "QEMU VM %s snapshotted to %s (%s RAM)", self.vm_id, snap, "file" if shared else "streamed"
            )

    async def save_memory_snapshot(self, files: SnapshotFiles, *, resume: bool = False) -> None:
        """Pause if running, :meth:`create_snapshot`, then resume when asked."""
        if self._state == MachineState.RUNNING:
            await self.pause()
        await self.create_snapshot(files)
        if resume:
            await self.resume()

    async def load_snapshot(
        self,
        files: SnapshotFiles,
        *,
        resume: bool = True,
        network_overrides: list[NetworkOverride] | None = None,
        vsock_uds_path: str | None = None,
    ) -> None:
        """Restore ``files`` into this fresh machine (instead of :meth:`start`).

        The machine spec comes from the snapshot's sidecar (or the constructor's ``spec``).
        ``network_overrides`` re-point interfaces at other TAPs; ``vsock_uds_path`` has no QEMU
        meaning (vhost-vsock has no host socket) and is ignored.
        """
        del vsock_uds_path
        async with self._lock:
            self._require(MachineState.NEW, action="load a snapshot into")
            snap = _absolute(files.snapshot_path)
            mem = _absolute(files.mem_file_path)
            if not _is_file(snap):
                raise SmartVMError(
                    ErrorCode.INVALID_CONFIG, f"snapshot file not found: {snap}", details={"path": str(snap)}
                )
            ram_mode, spec, had_backend = self._snapshot_spec(snap)
            if network_overrides:
                taps = {o.iface_id: o.host_dev_name for o in network_overrides}
                unknown = sorted(set(taps) - {n.id for n in spec.nics})
                if unknown:
                    raise SmartVMError(
                        ErrorCode.INVALID_ARGUMENT,
                        f"network override for unknown interface(s): {', '.join(unknown)}",
                    )
                spec = spec.model_copy(
                    update={
                        "nics": tuple(n.model_copy(update={"tap": taps.get(n.id, n.tap)}) for n in spec.nics)
                    }
                )
            if ram_mode == "file":
                spec = spec.model_copy(update={"memory_backend": MemoryBackendSpec(path=mem, share=False)})
            elif had_backend:
                # The stream fills a fresh RAM file of this VM's own (shared: it snapshots fast in turn).
                own = MemoryBackendSpec(path=self._ram_file(), share=True)
                spec = spec.model_copy(update={"memory_backend": own})
            # The snapshot's CPU state only fits the accelerator it was taken with.
            self._accel = AccelChoice(spec.accel, "from the snapshot")
            await self._launch(spec, incoming=True)
            try:
                await self._qmp_exec(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "x-ignore-shared", "state": ram_mode == "file"}]},
                )
                try:
                    await self._qmp_exec("migrate-incoming", {"uri": exec_uri("cat", snap)})
                    await self._await_migration(incoming=True)
                except SmartVMError as exc:
                    # QEMU exits when an incoming migration fails to load: say it was the snapshot.
                    stderr = self._stderr.output().strip()
                    why = stderr.splitlines()[-1] if stderr else exc.message
                    raise SmartVMError(
                        ErrorCode.SNAPSHOT_FAILED,
                        f"cannot restore snapshot {snap}: {why}",
                        details={"path": str(snap), "stderr": stderr, "cause": exc.code},
                    ) from exc
                if resume:
                    await self._qmp_exec("cont")
                    self._state = MachineState.RUNNING
            except BaseException:
                await shielded(self._teardown(graceful=False))
                self._state = MachineState.FAILED
                raise
            log.info("QEMU VM %s restored from %s", self.vm_id, snap)

    def _snapshot_spec(self, snap: Path) -> tuple[Literal["file", "stream"], QemuMachineSpec, bool]:
        side = _sidecar(snap)
        try:
            data = json.loads(side.read_text())
            ram_mode: Literal["file", "stream"] = "file" if data["ram"] == "file" else "stream"
            spec = self._spec or QemuMachineSpec.model_validate(data["spec"])
            had_backend = data.get("memory_backend") is True
            if not self._serial_names:
                self._serial_names = tuple(data.get("serial_ports", ()))
        except (OSError, ValueError, KeyError) as exc:
            raise SmartVMError(
                ErrorCode.INVALID_CONFIG,
                f"snapshot metadata {side} is missing or invalid: {exc}",
                details={"path": str(side)},
            ) from exc
        return ram_mode, spec, had_backend

    # --- stop -----------------------------------------------------------------------------

    async def stop(self, *, timeout: float = 5.0) -> None:
        """Shutdown ladder then undo every host change. Idempotent, safe in any state."""
        async with self._lock:
            if self._state == MachineState.STOPPED:
                return
            self._state = MachineState.STOPPING
            try:
                await shielded(self._teardown(graceful=True, timeout=timeout))
            finally:
                # A machine is single-use: once stopped (even after a failed cleanup) it stays stopped.
                self._state = MachineState.STOPPED

    async def _teardown(self, *, graceful: bool, timeout: float = 5.0) -> None:
        if graceful:
            await self._ladder(timeout)
        failures = await self._undo.run()
        if self._watcher is not None:
            await asyncio.wait([self._watcher])
        await self.console.aclose()
        await self._stderr.aclose()
        if failures:
            first = failures[0][1]
            raise SmartVMError(
                ErrorCode.STOP_FAILED, f"cleanup of QEMU VM {self.vm_id} failed: {first}"
            ) from first

    async def _ladder(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return

        async def quit_over_qmp() -> bool:
            if self._qmp is None or not self._qmp.connected:
                return False
            try:
                async with asyncio.timeout(timeout):
                    await self._qmp.execute("quit")
            except (SmartVMError, TimeoutError):
                pass  # the link may drop before the reply; the wait decides
            return True

        # QEMU leads its own process group; the group also holds the `cat` of an exec: migration.
        await stop_ladder(
            proc, graceful=quit_over_qmp, timeout=timeout, what=f"QEMU VM {self.vm_id}", log=log
        )

    async def _kill_process(self) -> None:
        if self._proc is not None:
            await self._proc.aclose()

    async def _remove_vm_dir(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.vm_dir, True)

    @staticmethod
    def _unlinker(path: Path) -> Callable[[], Awaitable[None]]:
        async def _unlink() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

        return _unlink

    def _push_undo(self, what: str, undo: UndoStep) -> None:
        self._undo.push(what, undo)
