"""Errors about the lifecycle of a :class:`~exec_sandbox.sandbox.scheduler.Scheduler` or a session.

Both sit in the one :class:`~exec_sandbox.errors.SandboxError` tree::

    SandboxTransientError
    └── SchedulerClosedError   the Scheduler was closed before the code ran (nothing ran)
    SandboxInputError
    └── SessionClosedError     a call on a session that is closed (``context["reason"]`` says why:
                               closed, idle_timeout, scheduler_closed, vm_failed, guest_unresponsive)

A run or session exec whose code had already been sent to the guest when the Scheduler or session
closed fails with :class:`~exec_sandbox.errors.CommunicationOutcomeUnknownError` instead (the code
may have run; its VM is gone either way), ``context["reason"]`` naming the closure.
"""

from __future__ import annotations

from typing import Final, Literal

from exec_sandbox.errors import SandboxInputError, SandboxTransientError

__all__ = [
    "CLOSE_REASONS",
    "CloseReason",
    "SchedulerClosedError",
    "SessionClosedError",
]

CloseReason = Literal["closed", "idle_timeout", "scheduler_closed", "vm_failed", "guest_unresponsive"]
CLOSE_REASONS: Final[tuple[CloseReason, ...]] = (
    "closed", "idle_timeout", "scheduler_closed", "vm_failed", "guest_unresponsive",
)


class SchedulerClosedError(SandboxTransientError):
    """The Scheduler is closed (or closed while this call waited); the code did not run."""


class SessionClosedError(SandboxInputError):
    """The session is closed: by ``close()``, its idle timeout, its Scheduler, or a failed VM."""
