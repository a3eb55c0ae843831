"""The one exception root of :mod:`exec_sandbox`.

::

    SandboxError                         root; every error carries ``context`` (a dict)
    ├── SandboxInputError                the caller's bug: bad code/env/path/limits (never retry)
    │   └── PackageResolutionError       ``packages=`` cannot be installed: unknown package, no such
    │                                    version, conflicting pins, no wheel for the guest, hash
    │                                    mismatch (``package``, ``reason``, resolver ``stderr``)
    ├── SandboxTransientError            the sandbox never ran the code; safe to retry
    │   ├── VmCapacityError              admission control: no capacity within the wait timeout
    │   └── PackageFetchError            the host's package index/registry was unreachable (``stderr``)
    ├── SandboxPermanentError            cannot succeed on this host as configured
    │   ├── ImageBuildError              building a guest image failed (``step``, ``stderr``)
    │   └── QemuStorageDaemonError       qemu-storage-daemon / QMP failure (``error_class``)
    ├── GuestAgentError                  the guest agent broke the protocol or refused a request
    │   ├── GuestProtocolError           the guest misbehaved (bad/oversize frame, flood beyond a cap,
    │   │                                frame for a request never made): the connection is dropped
    │   │                                and the VM killed (``reason``, ``request_id``, ``limit_bytes``,
    │   │                                ``received_bytes``)
    │   │   └── FrameError               (protocol.agent) a frame or message failed to decode/validate
    │   └── GuestFileTooLargeError       a guest file passed the host's cap while it was being read
    │                                    (``path``, ``limit_bytes``, ``received_bytes``); the transfer
    │                                    was ended at the cap, the VM stays usable
    └── CommunicationOutcomeUnknownError the transport died after the request was dispatched

``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CommunicationOutcomeUnknownError",
    "GuestAgentError",
    "GuestFileTooLargeError",
    "GuestProtocolError",
    "ImageBuildError",
    "PackageFetchError",
    "PackageResolutionError",
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


class PackageResolutionError(SandboxInputError):
    """``packages=`` cannot be installed as asked; ``package`` names it, ``reason`` says why."""

    def __init__(
        self,
        message: str,
        *,
        package: str,
        reason: str,
        stderr: str = "",
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, context={"field": "packages", "package": package, "reason": reason,
                                           "stderr": stderr, **(context or {})})
        self.package = package
        self.reason = reason
        self.stderr = stderr


class PackageFetchError(SandboxTransientError):
    """The host could not download packages (network, index down); nothing ran; retry later."""

    def __init__(self, message: str, *, stderr: str = "", context: dict[str, Any] | None = None) -> None:
        super().__init__(message, context={"field": "packages", "stderr": stderr, **(context or {})})
        self.stderr = stderr


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


class GuestProtocolError(GuestAgentError):
    """The guest broke the protocol or flooded past a host-enforced cap; never the caller's fault.

    The host drops the agent connection when it raises this, and the layers above kill the VM.
    ``reason`` is a short machine-readable code (e.g. ``"bad_frame"``, ``"output_cap"``,
    ``"unknown_request"``, ``"stray_frames"``, ``"bad_chunk"``, ``"unexpected_message"``).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str = "protocol",
        request_id: str | None = None,
        limit_bytes: int | None = None,
        received_bytes: int | None = None,
        context: dict[str, Any] | None = None,
    ) -> None:
        extra = {"reason": reason, "request_id": request_id, "limit_bytes": limit_bytes,
                 "received_bytes": received_bytes}
        super().__init__(message, context={**{k: v for k, v in extra.items() if v is not None},
                                           **(context or {})})
        self.reason = reason
        self.request_id = request_id
        self.limit_bytes = limit_bytes
        self.received_bytes = received_bytes


class GuestFileTooLargeError(GuestAgentError):
    """A file read from the guest grew past the host's cap; the transfer was ended at the cap.

    ``received_bytes`` is how much had arrived when the host stopped (at most ``limit_bytes`` plus
    one chunk; nothing beyond ``limit_bytes`` was kept).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        limit_bytes: int,
        received_bytes: int,
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, context={"path": path, "limit_bytes": limit_bytes,
                                           "received_bytes": received_bytes, **(context or {})})
        self.path = path
        self.limit_bytes = limit_bytes
        self.received_bytes = received_bytes
