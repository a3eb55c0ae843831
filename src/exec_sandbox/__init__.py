"""exec_sandbox: run untrusted Python / JavaScript / shell code in microVMs.

::

    from exec_sandbox import Scheduler
    async with Scheduler() as scheduler:
        result = await scheduler.run(code="print('hi')", language="python")
        async with await scheduler.session(language="python") as s:
            await s.exec("x = 41")
            print((await s.exec("print(x + 1)")).stdout)   # 42

Errors form one tree rooted at :class:`SandboxError` (see :mod:`exec_sandbox.errors`).
Exports other than the errors are imported lazily (PEP 562), so ``sbx`` starts fast.
"""

from typing import TYPE_CHECKING

from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestAgentError,
    GuestFileTooLargeError,
    GuestProtocolError,
    ImageBuildError,
    PackageFetchError,
    PackageResolutionError,
    QemuStorageDaemonError,
    SandboxError,
    SandboxInputError,
    SandboxPermanentError,
    SandboxTransientError,
    VmCapacityError,
)
from smartvm.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from exec_sandbox.client.agent import AgentClient, AgentClientState, ExecResult
    from exec_sandbox.config import SchedulerConfig
    from exec_sandbox.egress import EgressLimits, EgressLogEntry, EgressStats, Secret
    from exec_sandbox.models import (
        ExecutionResult,
        FileInfo,
        Language,
        PortForward,
        TimingBreakdown,
        language_from_path,
    )
    from exec_sandbox.packages.lock import LockedPackage, PackageLock
    from exec_sandbox.sandbox.admission import AdmissionController
    from exec_sandbox.sandbox.lifecycle_errors import SchedulerClosedError, SessionClosedError
    from exec_sandbox.sandbox.scheduler import RunResult, Scheduler, SchedulerState
    from exec_sandbox.sandbox.session import Session, SessionState
    from exec_sandbox.sandbox.warm_pool import WarmPool
    from exec_sandbox.settings import Settings
    from exec_sandbox.storage.daemon import QemuStorageDaemon
    from exec_sandbox.storage.overlay_pool import OverlayPool
    from exec_sandbox.vm.sandbox_vm import SandboxVm
    from exec_sandbox.vm.snapshots import SnapshotCache
    from exec_sandbox.vm.spec import BootTiming, SandboxVmState, VmOptions
    from exec_sandbox.vm_manager import ImageBundle, VmManager

_LAZY: dict[str, str] = {
    "AdmissionController": "exec_sandbox.sandbox.admission",
    "AgentClient": "exec_sandbox.client.agent",
    "AgentClientState": "exec_sandbox.client.agent",
    "BootTiming": "exec_sandbox.vm.spec",
    "EgressLimits": "exec_sandbox.egress.policy",
    "EgressLogEntry": "exec_sandbox.egress.accounting",
    "EgressStats": "exec_sandbox.egress.accounting",
    "ExecResult": "exec_sandbox.client.agent",
    "ExecutionResult": "exec_sandbox.models",
    "FileInfo": "exec_sandbox.models",
    "ImageBundle": "exec_sandbox.vm_manager",
    "Language": "exec_sandbox.models",
    "LockedPackage": "exec_sandbox.packages.lock",
    "OverlayPool": "exec_sandbox.storage.overlay_pool",
    "PackageLock": "exec_sandbox.packages.lock",
    "PortForward": "exec_sandbox.models",
    "QemuStorageDaemon": "exec_sandbox.storage.daemon",
    "RunResult": "exec_sandbox.sandbox.scheduler",
    "SandboxVm": "exec_sandbox.vm.sandbox_vm",
    "SandboxVmState": "exec_sandbox.vm.spec",
    "Secret": "exec_sandbox.egress.policy",
    "Scheduler": "exec_sandbox.sandbox.scheduler",
    "SchedulerClosedError": "exec_sandbox.sandbox.lifecycle_errors",
    "SchedulerConfig": "exec_sandbox.config",
    "SchedulerState": "exec_sandbox.sandbox.scheduler",
    "Session": "exec_sandbox.sandbox.session",
    "SessionClosedError": "exec_sandbox.sandbox.lifecycle_errors",
    "SessionState": "exec_sandbox.sandbox.session",
    "Settings": "exec_sandbox.settings",
    "SnapshotCache": "exec_sandbox.vm.snapshots",
    "TimingBreakdown": "exec_sandbox.models",
    "VmManager": "exec_sandbox.vm_manager",
    "VmOptions": "exec_sandbox.vm.spec",
    "WarmPool": "exec_sandbox.sandbox.warm_pool",
    "language_from_path": "exec_sandbox.models",
}


__all__ = [
    "AdmissionController",
    "AgentClient",
    "AgentClientState",
    "BootTiming",
    "CommunicationOutcomeUnknownError",
    "EgressLimits",
    "EgressLogEntry",
    "EgressStats",
    "ExecResult",
    "ExecutionResult",
    "FileInfo",
    "GuestAgentError",
    "GuestFileTooLargeError",
    "GuestProtocolError",
    "ImageBuildError",
    "ImageBundle",
    "Language",
    "LockedPackage",
    "OverlayPool",
    "PackageFetchError",
    "PackageLock",
    "PackageResolutionError",
    "PortForward",
    "QemuStorageDaemon",
    "QemuStorageDaemonError",
    "RunResult",
    "SandboxError",
    "SandboxInputError",
    "SandboxPermanentError",
    "SandboxTransientError",
    "SandboxVm",
    "SandboxVmState",
    "Scheduler",
    "SchedulerClosedError",
    "SchedulerConfig",
    "SchedulerState",
    "Secret",
    "Session",
    "SessionClosedError",
    "SessionState",
    "Settings",
    "SnapshotCache",
    "TimingBreakdown",
    "VmCapacityError",
    "VmManager",
    "VmOptions",
    "WarmPool",
    "language_from_path",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, __all__)
