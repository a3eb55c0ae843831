"""The one exception root of :mod:`exec_sandbox`.

::

    SandboxError                         root; every error carries ``context`` (a dict)
    ├── SandboxInputError                the caller's bug: bad code/env/path/limits (never retry)
    ├── SandboxTransientError            the sandbox never ran the code; safe to retry
    │   └── VmCapacityError              admission control: no capacity within the wait timeout
    ├── SandboxPermanentError            cannot succeed on this host as configured
    │   ├── ImageBuildError              building a guest image failed (``step``, ``stderr``)
    │   └── QemuStorageDaemonError       qemu-storage-daemon / QMP failure (``error_class``)
    ├── GuestAgentError                  the guest agent broke the protocol or refused a request
    └── CommunicationOutcomeUnknownError the transport died after the request was dispatched

``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

from typing import Any

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


class SandboxError(Exception):
    """Root of every error raised by :mod:`exec_sandbox`."""

    def __init__(self, message: str, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = dict(context or {})


class SandboxInputError(SandboxError, ValueError):
    """The caller passed something invalid; retrying the same call cannot help."""


class SandboxTransientError(SandboxError):
    """The code never ran (e.g. the VM failed to boot); the call is safe to retry."""


class VmCapacityError(SandboxTransientError):
    """No memory/CPU capacity became available within the admission timeout."""


class SandboxPermanentError(SandboxError):
    """This host cannot do what was asked as configured."""


class ImageBuildError(SandboxPermanentError):
    """Building a guest image failed at ``step``."""

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        stderr: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, context=context)
        self.step = step
        self.stderr = stderr


class QemuStorageDaemonError(SandboxPermanentError):
    """qemu-storage-daemon failed; ``error_class`` is QMP's error class when there is one."""

    def __init__(
        self, message: str, *, error_class: str | None = None, context: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, context=context)
        self.error_class = error_class


class GuestAgentError(SandboxError):
    """The guest agent sent an invalid frame or reported a failed request."""


class CommunicationOutcomeUnknownError(SandboxError):
    """The request reached the guest but the transport died before the answer: it may have run."""
