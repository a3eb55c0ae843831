"""SmartVM: the facade that creates, tracks and cleans up microVMs.

It owns three managers and every VM it created:

- ``image_manager``: per-VM writable rootfs copies (:class:`~smartvm.images.ImageManager`),
- ``base_image_manager``: cached, verified kernel + rootfs bundles,
- ``network_manager``: IPs, MACs, TAPs and the bridge.

``cleanup()`` stops every VM (in reverse creation order), frees their IPs, TAPs and
rootfs copies, then undoes the host network changes. It is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from smartvm.config import VMConfig
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images import BaseImageBundle, BaseImageManager, ImageManager
from smartvm.microvm import MicroVM, MicroVMState
from smartvm.network import NetworkManager
from smartvm.vmm.base import VmmBackend

__all__ = ["SmartVM", "VmmKind", "default_data_dir"]

_log = logging.getLogger(__name__)

VmmKind = Literal["firecracker", "qemu"]
_VMM_KINDS: tuple[str, ...] = ("firecracker", "qemu")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def default_data_dir() -> Path:
    """Where VM sockets and rootfs copies live by default (beside the base-image cache)."""
    return Path(tempfile.gettempdir()) / ".smartvm"


class SmartVM:
    """Create and manage microVMs with one backend (``vmm="firecracker"`` or ``"qemu"``)."""

    def __init__(
        self,
        *,
        data_dir: Path | str | None = None,
        arch: str | None = None,
        bridge_name: str = "smartvm0",
        subnet: str = "172.16.0.0/24",
        netns: str | None = None,
        vmm: VmmKind = "firecracker",
        firecracker_binary_path: str | Path = "firecracker",
        qemu_binary_path: str | None = None,
        accel: str | None = None,
        base_image_cache_dir: Path | str | None = None,
        max_stored_base_images: int = 2,
    ) -> None:
        if vmm not in _VMM_KINDS:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"vmm must be one of {', '.join(_VMM_KINDS)}, not {vmm!r}",
                details={"vmm": vmm},
            )
        self._data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self._vmm: VmmKind = vmm
        self._firecracker_binary = firecracker_binary_path
        self._qemu_binary = qemu_binary_path
        self._accel = accel
        self.image_manager = ImageManager(self._data_dir / "vms")
        self.base_image_manager = BaseImageManager(
            cache_dir=Path(base_image_cache_dir) if base_image_cache_dir is not None else None,
            max_stored_base_images=max_stored_base_images,
            arch=arch,
        )
        self.network_manager = NetworkManager(subnet=subnet, bridge_name=bridge_name, netns=netns)
        self._vms: dict[str, MicroVM] = {}
        self._lock = asyncio.Lock()

    # ---- read-only view

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def vmm(self) -> VmmKind:
        return self._vmm

    @property
    def vm_count(self) -> int:
        return len(self._vms)

    def list_vms(self) -> list[str]:
        """Ids of the tracked VMs, in creation order."""
        return list(self._vms)

    def get_vm(self, vm_id: str) -> MicroVM | None:
        return self._vms.get(vm_id)

    def require_vm(self, vm_id: str) -> MicroVM:
        vm = self._vms.get(vm_id)
        if vm is None:
            raise SmartVMError(ErrorCode.VM_NOT_FOUND, f"no VM with id {vm_id!r}", details={"vm_id": vm_id})
        return vm

    # ---- creation

    async def create_vm(
        self,
        config: Mapping[str, Any] | VMConfig,
        *,
        vm_id: str | None = None,
        base_image: BaseImageBundle | None = None,
        copy_rootfs: bool | None = None,
    ) -> MicroVM:
        """Register a VM (not started). ``base_image`` fills in the kernel and root drive.

        With a base image (or ``copy_rootfs=True``) the root drive is a private writable copy
        made by :attr:`image_manager`, so guests never write to a shared base.
        """
        vm_config = VMConfig(config)
        resolved_id = vm_id or vm_config.id or f"vm-{uuid.uuid4().hex[:12]}"
        if not _ID_RE.match(resolved_id):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"vm id {resolved_id!r} must be 1-64 characters of [A-Za-z0-9_-]",
                details={"vm_id": resolved_id},
            )
        async with self._lock:
            if resolved_id in self._vms:
                raise SmartVMError(
                    ErrorCode.VM_ALREADY_EXISTS, f"a VM with id {resolved_id!r} already exists"
                )
            if base_image is not None:
                vm_config = _apply_base_image(vm_config, base_image)
            if copy_rootfs or (copy_rootfs is None and base_image is not None):
                vm_config = await self._with_rootfs_copy(resolved_id, vm_config)
            try:
                self._socket_path(resolved_id).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                vm = MicroVM(
                    resolved_id,
                    vm_config,
                    self._firecracker_binary,
                    self._socket_path(resolved_id),
                    self.network_manager,
                    backend=self._make_backend(resolved_id),
                )
            except BaseException:
                await self.image_manager.remove(resolved_id)
                raise
            self._vms[resolved_id] = vm
        return vm

    def _socket_path(self, vm_id: str) -> Path:
        return self._data_dir / "sockets" / f"{vm_id}.sock"

    def _make_backend(self, vm_id: str) -> VmmBackend | None:
        if self._vmm == "firecracker":
            return None  # MicroVM's default: FirecrackerMachine on the socket path
        from smartvm.qemu import QemuMachine

        return QemuMachine(
            vm_id=vm_id,
            binary=self._qemu_binary,
            runtime_dir=self._data_dir / "qemu",
            accel=self._accel,
        )

    async def _with_rootfs_copy(self, vm_id: str, vm_config: VMConfig) -> VMConfig:
        data = vm_config.to_dict()
        for drive in data.get("drives") or []:
            if drive.get("is_root_device") and drive.get("path_on_host"):
                copy = await self.image_manager.prepare_rootfs(vm_id, Path(drive["path_on_host"]))
                drive["path_on_host"] = str(copy)
                drive["is_read_only"] = False
        return VMConfig(data)

    # ---- teardown

    async def remove_vm(self, vm_id: str) -> None:
        """Stop one VM and free everything it holds. Unknown ids raise VM_NOT_FOUND."""
        vm = self.require_vm(vm_id)
        try:
            await vm.stop()
        finally:
            self._vms.pop(vm_id, None)
            await self.image_manager.remove(vm_id)

    async def cleanup(self) -> None:
        """Stop every VM (newest first), free their resources, undo host network changes."""
        errors: list[BaseException] = []
        for vm_id in reversed(list(self._vms)):
            try:
                await self.remove_vm(vm_id)
            except SmartVMError as exc:
                _log.warning("cleanup: stopping %s failed: %s", vm_id, exc)
                errors.append(exc)
        for step in (self.image_manager.cleanup, self.network_manager.cleanup):
            try:
                await step()
            except SmartVMError as exc:
                _log.warning("cleanup: %s", exc)
                errors.append(exc)
        if errors:
            raise SmartVMError(
                ErrorCode.STOP_FAILED,
                f"cleanup finished with {len(errors)} error(s): {errors[0]}",
                details={"errors": [str(e) for e in errors]},
            ) from errors[0]

    async def __aenter__(self) -> SmartVM:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cleanup()

    def running_vms(self) -> list[str]:
        return [vm_id for vm_id, vm in self._vms.items() if vm.state is MicroVMState.RUNNING]


def _apply_base_image(vm_config: VMConfig, bundle: BaseImageBundle) -> VMConfig:
    """Fill the kernel and root drive from a bundle, unless the config already names them."""
    data = vm_config.to_dict()
    boot = dict(data.get("boot_source") or {})
    boot.setdefault("kernel_image_path", str(bundle.kernel_image_path))
    if bundle.boot_args and not boot.get("boot_args"):
        boot["boot_args"] = bundle.boot_args
    data["boot_source"] = boot
    drives = list(data.get("drives") or [])
    if not any(d.get("is_root_device") for d in drives):
        drives.insert(
            0,
            {
                "drive_id": "rootfs",
                "path_on_host": str(bundle.rootfs_path),
                "is_root_device": True,
                "is_read_only": bool(bundle.rootfs_is_read_only),
            },
        )
    data["drives"] = drives
    return VMConfig(data)
