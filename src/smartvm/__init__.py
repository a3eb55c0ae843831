"""smartvm: a microVM manager whose configuration speaks Firecracker's API.

Layers (imports point down): ``config`` (typed Firecracker payloads) ·
``transport`` (HTTP over the API socket) · ``vmm`` / ``qemu`` (one VMM process each) ·
``network`` (addressing + netlink) · ``images`` (base-image bundles) ·
``microvm`` (lifecycle) · ``facade`` (:class:`SmartVM`) · ``cli``.
"""

# Imports are lazy (PEP 562): `import smartvm.qemu` must not pay for pyroute2, httpx and every
# pydantic model of the Firecracker API. Type checkers see the real imports below.

from typing import TYPE_CHECKING

from smartvm.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from smartvm.config import (
        ConfigStep,
        ValidationResult,
        VMConfig,
        VMConfigModel,
        boot_configuration_steps,
    )
    from smartvm.errors import ErrorCode, SmartVMError
    from smartvm.facade import SmartVM, VmmKind
    from smartvm.images import BaseImageBundle, BaseImageManager, ImageManager, ProgressEvent
    from smartvm.microvm import MicroVM, MicroVMState
    from smartvm.network import NetworkManager, TapInfo
    from smartvm.qemu import AccelChoice, QemuMachine, QemuMachineSpec, choose_accelerator
    from smartvm.transport import SocketClient
    from smartvm.vmm.base import NetworkOverride, SnapshotFiles, VmmBackend, VmmInfo, VmmRunState
    from smartvm.vmm.firecracker import FirecrackerMachine

_LAZY: dict[str, str] = {
    "AccelChoice": "smartvm.qemu",
    "BaseImageBundle": "smartvm.images",
    "BaseImageManager": "smartvm.images",
    "ConfigStep": "smartvm.config",
    "ErrorCode": "smartvm.errors",
    "FirecrackerMachine": "smartvm.vmm.firecracker",
    "ImageManager": "smartvm.images",
    "MicroVM": "smartvm.microvm",
    "MicroVMState": "smartvm.microvm",
    "NetworkManager": "smartvm.network",
    "NetworkOverride": "smartvm.vmm.base",
    "ProgressEvent": "smartvm.images",
    "QemuMachine": "smartvm.qemu",
    "QemuMachineSpec": "smartvm.qemu",
    "SmartVM": "smartvm.facade",
    "SmartVMError": "smartvm.errors",
    "SnapshotFiles": "smartvm.vmm.base",
    "SocketClient": "smartvm.transport",
    "TapInfo": "smartvm.network",
    "VMConfig": "smartvm.config",
    "VMConfigModel": "smartvm.config",
    "ValidationResult": "smartvm.config",
    "VmmBackend": "smartvm.vmm.base",
    "VmmInfo": "smartvm.vmm.base",
    "VmmKind": "smartvm.facade",
    "VmmRunState": "smartvm.vmm.base",
    "boot_configuration_steps": "smartvm.config",
    "choose_accelerator": "smartvm.qemu",
}


__all__ = [
    "AccelChoice",
    "BaseImageBundle",
    "BaseImageManager",
    "ConfigStep",
    "ErrorCode",
    "FirecrackerMachine",
    "ImageManager",
    "MicroVM",
    "MicroVMState",
    "NetworkManager",
    "NetworkOverride",
    "ProgressEvent",
    "QemuMachine",
    "QemuMachineSpec",
    "SmartVM",
    "SmartVMError",
    "SnapshotFiles",
    "SocketClient",
    "TapInfo",
    "VMConfig",
    "VMConfigModel",
    "ValidationResult",
    "VmmBackend",
    "VmmInfo",
    "VmmKind",
    "VmmRunState",
    "boot_configuration_steps",
    "choose_accelerator",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
