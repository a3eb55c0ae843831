"""MicroVM: one guest's lifecycle on top of any :class:`~smartvm.vmm.base.VmmBackend`.

States (:class:`MicroVMState`)::

    CREATED --start()--> STARTING --> RUNNING <--pause()/resume()--> PAUSED
       |                    |            |                              |
       |                    +--failure--> ERROR                         |
       +-------------------- stop() from any state --> STOPPED <--------+

A call in the wrong state raises ``SmartVMError(INVALID_STATE)`` naming the state;
``get_info()`` on a VM whose VMM is not running raises ``NO_CLIENT``. ``start()`` on a
running VM and ``stop()`` on a stopped one are no-ops. Interfaces without a
``host_dev_name`` get a TAP from the :class:`NetworkManager`, removed again on stop
or on a failed start.
"""

from __future__ import annotations

import asyncio
import logging
import re
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from smartvm.config import VMConfig
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.vmm.base import NetworkOverride, SnapshotFiles, VmmBackend, VmmInfo
from smartvm.vmm.firecracker import FirecrackerMachine

if TYPE_CHECKING:
    from smartvm.network import NetworkManager, TapInfo

__all__ = ["MicroVM", "MicroVMState"]

_log = logging.getLogger(__name__)

_VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Firecracker's --id rule (validate_instance_id): alphanumerics and '-', at most 64.
_FC_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class MicroVMState(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"


class MicroVM:
    """One microVM. The config is deep-copied; the backend is owned and stopped with the VM."""

    def __init__(
        self,
        vm_id: str,
        config: dict[str, Any] | VMConfig,
        binary_path: str | Path,
        socket_path: str | Path,
        network_manager: NetworkManager,
        *,
        backend: VmmBackend | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        if not isinstance(vm_id, str) or not _VM_ID_RE.match(vm_id):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"vm_id {vm_id!r} must be 1-64 characters of [A-Za-z0-9_-], starting with a letter or digit",
            )
        self._id = vm_id
        self._config = VMConfig(config)
        self._binary_path = Path(binary_path)
        self._socket_path = Path(socket_path)
        self._network_manager = network_manager
        self._backend: VmmBackend = (
            backend
            if backend is not None
            else FirecrackerMachine(
                binary_path, socket_path, instance_id=vm_id if _FC_ID_RE.match(vm_id) else None
            )
        )
        self._stop_timeout = stop_timeout
        self._state = MicroVMState.CREATED
        self._taps: list[TapInfo] = []
        self._lock = asyncio.Lock()
        self._error: BaseException | None = None

    # ---- read-only view

    @property
    def id(self) -> str:
        return self._id

    @property
    def state(self) -> MicroVMState:
        return self._state

    @property
    def config(self) -> VMConfig:
        """The VM's own config (a copy of what was passed in)."""
        return self._config

    @property
    def backend(self) -> VmmBackend:
        return self._backend

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    @property
    def pid(self) -> int | None:
        return self._backend.pid

    @property
    def taps(self) -> list[TapInfo]:
        """TAPs this VM created through the network manager (empty once stopped)."""
        return list(self._taps)

    @property
    def last_error(self) -> BaseException | None:
        """What put the VM into ``ERROR``, if anything."""
        return self._error

    def _require(self, *allowed: MicroVMState, action: str) -> None:
        if self._state not in allowed:
            raise SmartVMError(
                ErrorCode.INVALID_STATE,
                f"cannot {action} VM {self._id!r}: it is {self._state.value}"
                f" (allowed: {', '.join(s.value for s in allowed)})",
                details={"vm_id": self._id, "state": self._state.value},
            )

    # ---- lifecycle

    async def start(self) -> None:
        """Validate the config, create missing TAPs, boot. No-op when already running."""
        async with self._lock:
            if self._state is MicroVMState.RUNNING:
                return
            self._require(MicroVMState.CREATED, action="start")
            boot_config, wanted_taps = self._plan_network()
            result = boot_config.validate()
            if not result.valid:
                raise SmartVMError(
                    ErrorCode.INVALID_CONFIG,
                    f"invalid config for VM {self._id!r}: " + "; ".join(result.errors),
                    details={"vm_id": self._id, "errors": list(result.errors)},
                )
            self._state = MicroVMState.STARTING
            try:
                await self._create_taps(boot_config, wanted_taps)
                await self._backend.start(boot_config)
            except BaseException as exc:
                await self._fail(exc)
                raise
            self._state = MicroVMState.RUNNING

    async def load_snapshot(
        self,
        snapshot_path: str | Path,
        mem_file_path: str | Path,
        *,
        resume: bool = True,
        network_overrides: list[NetworkOverride] | None = None,
        vsock_uds_path: str | None = None,
    ) -> None:
        """Boot this (never started) VM from a snapshot instead of its config."""
        async with self._lock:
            self._require(MicroVMState.CREATED, action="load a snapshot into")
            files = SnapshotFiles(Path(snapshot_path), Path(mem_file_path))
            self._state = MicroVMState.STARTING
            try:
                await self._backend.load_snapshot(
                    files, resume=resume, network_overrides=network_overrides, vsock_uds_path=vsock_uds_path
                )
            except BaseException as exc:
                await self._fail(exc)
                raise
            self._state = MicroVMState.RUNNING if resume else MicroVMState.PAUSED

    async def pause(self) -> None:
        async with self._lock:
            self._require(MicroVMState.RUNNING, action="pause")
            await self._backend.pause()
            self._state = MicroVMState.PAUSED

    async def resume(self) -> None:
        async with self._lock:
            self._require(MicroVMState.PAUSED, action="resume")
            await self._backend.resume()
            self._state = MicroVMState.RUNNING

    async def snapshot(
        self, snapshot_path: str | Path, mem_file_path: str | Path, *, snapshot_type: str = "Full"
    ) -> SnapshotFiles:
        """Write a snapshot of the paused VM; returns where it went."""
        async with self._lock:
            self._require(MicroVMState.PAUSED, action="snapshot")
            files = SnapshotFiles(Path(snapshot_path), Path(mem_file_path))
            await self._backend.create_snapshot(files, snapshot_type=snapshot_type)
            return files

    async def get_info(self) -> VmmInfo:
        if self._state not in (MicroVMState.RUNNING, MicroVMState.PAUSED):
            raise SmartVMError(
                ErrorCode.NO_CLIENT,
                f"VM {self._id!r} has no running VMM to ask (state {self._state.value})",
                details={"vm_id": self._id, "state": self._state.value},
            )
        return await self._backend.get_info()

    async def stop(self) -> None:
        """Shut the VMM down and undo every host change. Safe in any state, and more than once."""
        async with self._lock:
            if self._state is MicroVMState.STOPPED:
                return
            try:
                await self._backend.stop(timeout=self._stop_timeout)
            finally:
                try:
                    await self._detach_network()
                finally:
                    self._state = MicroVMState.STOPPED

    async def wait(self) -> int | None:
        """Wait for the VMM process to exit (e.g. the guest powered off)."""
        return await self._backend.wait()

    # ---- helpers

    async def _fail(self, exc: BaseException) -> None:
        self._error = exc
        try:
            await self._backend.stop(timeout=self._stop_timeout)
        except SmartVMError as cleanup_exc:
            _log.warning("cleanup of VM %s after failed start: %s", self._id, cleanup_exc)
        finally:
            try:
                await self._detach_network()
            finally:
                self._state = MicroVMState.ERROR

    def _plan_network(self) -> tuple[VMConfig, list[int]]:
        """A per-boot copy of the config with the TAP names/MACs to be created filled in (pure)."""
        boot_config = VMConfig(self._config)
        wanted: list[int] = []
        for index, iface in enumerate(boot_config.config.network_interfaces):
            if iface.host_dev_name or not iface.iface_id:
                continue  # an id-less interface is left for validation to report
            iface.host_dev_name = self._network_manager.generate_tap_name(self._id, iface.iface_id)
            if not iface.guest_mac:
                iface.guest_mac = self._network_manager.generate_mac(self._id, iface.iface_id)
            wanted.append(index)
        return boot_config, wanted

    async def _create_taps(self, boot_config: VMConfig, wanted: list[int]) -> None:
        model = boot_config.config
        for index in wanted:
            iface = model.network_interfaces[index]
            assert iface.iface_id is not None
            tap = await self._network_manager.create_tap(self._id, iface.iface_id)
            self._taps.append(tap)
            iface.host_dev_name = tap.tap_name
            # The kernel's ip= configures one interface: the first one we made, if the caller set none.
            if len(self._taps) == 1 and model.boot_source is not None:
                args = model.boot_source.boot_args or ""
                if not re.search(r"(^|\s)ip=", args):
                    ip_arg = self._network_manager.get_guest_network_boot_args(tap, f"eth{index}")
                    model.boot_source.boot_args = f"{args} {ip_arg}".strip()

    async def _detach_network(self) -> None:
        errors: list[str] = []
        while self._taps:
            tap = self._taps.pop()
            try:
                await self._network_manager.delete_tap(tap.tap_name)
            except SmartVMError as exc:
                errors.append(f"{tap.tap_name}: {exc}")
        if errors:
            raise SmartVMError(
                ErrorCode.STOP_FAILED,
                f"could not remove TAPs of VM {self._id!r}: " + "; ".join(errors),
                details={"vm_id": self._id},
            )

    async def __aenter__(self) -> MicroVM:
        # Entering does not boot: the body chooses start() or load_snapshot(); leaving always stops.
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"MicroVM(id={self._id!r}, state={self._state.value!r}, backend={self._backend.name!r})"
