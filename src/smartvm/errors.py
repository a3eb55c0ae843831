"""The one exception root of :mod:`smartvm`.

Every error raised by the package is a :class:`SmartVMError` carrying a stable,
machine-readable ``code`` (see :class:`ErrorCode`) plus optional fields::

    SmartVMError(code, message)
    ├── .code            stable string, e.g. "INVALID_STATE"
    ├── .status_code     HTTP status of a VMM API error, if any
    ├── .fault_message   Firecracker's ``fault_message``, if any
    ├── .details         free-form mapping with context (paths, ids, stderr tail)
    └── .retryable       True when the operation never ran and may be retried

    Subclasses (same codes and fields, plus their own):
    └── smartvm.hostfs.UnsafePathError   .path, .problem (UNSAFE_PATH / PATH_EXISTS)

Third-party errors are wrapped at the boundary with ``raise SmartVMError(...) from exc``;
``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

__all__ = ["ErrorCode", "SmartVMError"]


class ErrorCode(StrEnum):
    """Stable error codes. Values never change once released."""

    # configuration
    INVALID_CONFIG = "INVALID_CONFIG"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    # lifecycle
    INVALID_STATE = "INVALID_STATE"
    NO_CLIENT = "NO_CLIENT"
    VM_NOT_FOUND = "VM_NOT_FOUND"
    VM_ALREADY_EXISTS = "VM_ALREADY_EXISTS"
    VMM_NOT_FOUND = "VMM_NOT_FOUND"
    VMM_START_FAILED = "VMM_START_FAILED"
    VMM_EXITED = "VMM_EXITED"
    SOCKET_TIMEOUT = "SOCKET_TIMEOUT"
    STOP_FAILED = "STOP_FAILED"
    SNAPSHOT_FAILED = "SNAPSHOT_FAILED"
    # API transport
    API_ERROR = "API_ERROR"
    API_TIMEOUT = "API_TIMEOUT"
    API_CONNECTION_FAILED = "API_CONNECTION_FAILED"
    QMP_ERROR = "QMP_ERROR"
    # networking
    INVALID_SUBNET = "INVALID_SUBNET"
    IP_EXHAUSTED = "IP_EXHAUSTED"
    INVALID_IP = "INVALID_IP"
    INVALID_INTERFACE_NAME = "INVALID_INTERFACE_NAME"
    NETWORK_SETUP_FAILED = "NETWORK_SETUP_FAILED"
    # base images
    INVALID_BASE_IMAGE_CACHE_LIMIT = "INVALID_BASE_IMAGE_CACHE_LIMIT"
    INVALID_BASE_IMAGE_MANIFEST = "INVALID_BASE_IMAGE_MANIFEST"
    BASE_IMAGE_MANIFEST_FAILED = "BASE_IMAGE_MANIFEST_FAILED"
    BASE_IMAGE_DOWNLOAD_FAILED = "BASE_IMAGE_DOWNLOAD_FAILED"
    BASE_IMAGE_CHECKSUM_MISMATCH = "BASE_IMAGE_CHECKSUM_MISMATCH"
    BASE_IMAGE_NOT_FOUND = "BASE_IMAGE_NOT_FOUND"
    INVALID_PRESET = "INVALID_PRESET"
    IMAGE_COPY_FAILED = "IMAGE_COPY_FAILED"
    # host filesystem safety (smartvm.hostfs)
    UNSAFE_PATH = "UNSAFE_PATH"
    PATH_EXISTS = "PATH_EXISTS"


class SmartVMError(Exception):
    """Root of every error raised by :mod:`smartvm`."""

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        status_code: int | None = None,
        fault_message: str | None = None,
        details: Mapping[str, Any] | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.code: str = str(code)
        self.message = message
        self.status_code = status_code
        self.fault_message = fault_message
        self.details: dict[str, Any] = dict(details or {})
        self.retryable = retryable

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def __repr__(self) -> str:
        return f"SmartVMError(code={self.code!r}, message={self.message!r})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, used by the CLI's ``--json`` output."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.status_code is not None:
            out["status_code"] = self.status_code
        if self.fault_message is not None:
            out["fault_message"] = self.fault_message
        if self.details:
            out["details"] = {k: str(v) for k, v in self.details.items()}
        return out
