"""smartvm: a microVM manager whose configuration speaks Firecracker's API.

Layers (imports point down): ``config`` (typed Firecracker payloads) ·
``transport`` (HTTP over the API socket) · ``vmm`` / ``qemu`` (one VMM process each) ·
``network`` (addressing + netlink) · ``images`` (base-image bundles) ·
``microvm`` (lifecycle) · ``facade`` (:class:`SmartVM`) · ``cli``.
"""

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
