"""Errors of ``sbx serve``: each maps to an HTTP status and E2B's error body ``{"code", "message"}``.

::

    SandboxError (exec_sandbox.errors)
    └── ServeError                 status + message, rendered as E2B's error JSON
        ├── UnauthorizedError      401: missing or unknown API key / access token
        ├── NotFoundError          404: no such sandbox *for this key* (another key's is not found either)
        ├── QuotaExceededError     429: the key's concurrent-sandbox quota is used up
        └── BadRequestError        400: malformed body, bad path, oversize upload
"""

from __future__ import annotations

from typing import Any

from exec_sandbox.errors import SandboxError, SandboxInputError, SandboxTransientError

__all__ = [
    "BadRequestError",
    "NotFoundError",
    "QuotaExceededError",
    "ServeError",
    "UnauthorizedError",
    "status_for",
]


class ServeError(SandboxError):
    """An error the service reports to its caller as ``status`` with E2B's error body."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None, context: dict[str, Any] | None = None):
        super().__init__(message, context=context)
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        return {"code": self.status, "message": self.message}


class UnauthorizedError(ServeError):
    status = 401


class NotFoundError(ServeError):
    status = 404


class QuotaExceededError(ServeError):
    status = 429


class BadRequestError(ServeError):
    status = 400


def status_for(exc: SandboxError) -> int:
    """The HTTP status an error of ours is reported as (a VM that could not be made now: 503)."""
    if isinstance(exc, ServeError):
        return exc.status
    if isinstance(exc, SandboxInputError):
        return 400
    if isinstance(exc, SandboxTransientError):  # VmCapacityError included
        return 503
    return 500
