"""The contract every VMM backend fulfils, so :class:`smartvm.MicroVM` stays backend-agnostic.

A backend owns exactly one VMM process and everything it created for it (API
socket, console log, TAP attachments it made, temp files). ``stop()`` undoes all
of it, in reverse, once, and is safe to call in any state and more than once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from smartvm.config import VMConfig

__all__ = ["NetworkOverride", "SnapshotFiles", "VmmBackend", "VmmInfo", "VmmRunState"]


class VmmRunState(StrEnum):
    """What the VMM itself reports (Firecracker's ``InstanceInfo.state`` vocabulary)."""

    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"


@dataclass(frozen=True)
class VmmInfo:
    """Backend-neutral view of ``GET /`` (Firecracker) or ``query-status`` (QEMU)."""

    id: str
    state: VmmRunState
    vmm: str  # "firecracker" | "qemu"
    vmm_version: str
    pid: int | None
    accelerator: str | None = None  # "kvm" | "tcg" (QEMU); Firecracker is always "kvm"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotFiles:
    """Where a snapshot lives: VM state (device/CPU) and guest memory."""

    snapshot_path: Path
    mem_file_path: Path


@dataclass(frozen=True)
class NetworkOverride:
    """Re-point a snapshotted interface at another host TAP on load (Firecracker ``network_overrides``)."""

    iface_id: str
    host_dev_name: str


@runtime_checkable
class VmmBackend(Protocol):
    """One VMM process. Implemented by FirecrackerMachine and QemuMachine."""

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    async def start(self, config: VMConfig) -> None:
        """Spawn the VMM, apply ``config`` and boot the guest. On any failure, clean up and raise."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def create_snapshot(self, files: SnapshotFiles, *, snapshot_type: str = "Full") -> None:
        """Save the (paused) VM to ``files``; SmartVMError(INVALID_STATE) unless paused."""

    async def load_snapshot(
        self,
        files: SnapshotFiles,
        *,
        resume: bool = True,
        network_overrides: list[NetworkOverride] | None = None,
        vsock_uds_path: str | None = None,
    ) -> None:
        """Start a fresh VMM process from ``files`` (instead of :meth:`start`)."""

    async def get_info(self) -> VmmInfo: ...

    async def stop(self, *, timeout: float = 5.0) -> None:
        """Shutdown ladder (graceful -> SIGTERM -> SIGKILL), then undo every host change. Idempotent."""

    async def wait(self) -> int | None:
        """Wait until the VMM process exits; return its exit code (None if it was never started)."""
