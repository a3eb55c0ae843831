"""exec_sandbox: run untrusted Python / JavaScript / shell code in microVMs."""

from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestAgentError,
    ImageBuildError,
    QemuStorageDaemonError,
    SandboxError,
    SandboxInputError,
    SandboxPermanentError,
    SandboxTransientError,
    VmCapacityError,
)

__all__ = [
    "CommunicationOutcomeUnknownError",
    "GuestAgentError",
    "ImageBuildError",
    "QemuStorageDaemonError",
    "SandboxError",
    "SandboxInputError",
    "SandboxPermanentError",
    "SandboxTransientError",
    "VmCapacityError",
]
