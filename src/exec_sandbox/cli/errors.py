"""Library errors and results -> exit codes and one stderr line: the CLI's one error boundary.

The exit-code table is documented in :mod:`exec_sandbox.cli.run` (``sbx run --help``).
"""

from __future__ import annotations

import enum
import json
import logging
from typing import TYPE_CHECKING, Any, Final

from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    SandboxError,
    SandboxInputError,
    SandboxTransientError,
)
from exec_sandbox.models import ExecutionResult

if TYPE_CHECKING:

    pass

__all__ = [
    "ExitCode",
    "exit_code_for_error",
    "exit_code_for_result",
    "format_error",
]

logger = logging.getLogger(__name__)


class ExitCode(enum.IntEnum):
    """``sbx run``'s own exit codes (everything else is the program's)."""

    TIMEOUT = 124
    SANDBOX_ERROR = 125
    INVALID_INPUT = 126
    INTERRUPTED = 130
    OOM_KILLED = 137
    TERMINATED = 143


_CONTEXT_SKIP: Final = frozenset({"errors"})


_CONTEXT_MAX_ITEMS: Final = 4


_CONTEXT_MAX_CHARS: Final = 80


def exit_code_for_result(result: ExecutionResult) -> int:
    """The process exit code that reports ``result`` (see the module docstring)."""
    if result.timed_out:
        return ExitCode.TIMEOUT
    if result.oom_killed:
        return ExitCode.OOM_KILLED
    if 0 <= result.exit_code <= 255:
        return result.exit_code
    return ExitCode.SANDBOX_ERROR  # not a code a process can have: the sandbox reported nonsense


def exit_code_for_error(exc: BaseException) -> int:
    if isinstance(exc, SandboxInputError):
        return ExitCode.INVALID_INPUT
    return ExitCode.SANDBOX_ERROR


def _short(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= _CONTEXT_MAX_CHARS else text[: _CONTEXT_MAX_CHARS - 1] + "…"


def format_error(exc: BaseException) -> str:
    """One line: ``ErrorClass: message [key=value ...]`` with the most telling context."""
    message = " ".join(str(exc).split()) or "(no message)"
    extras: list[str] = []
    if isinstance(exc, SandboxError):
        for key, value in exc.context.items():
            if key in _CONTEXT_SKIP or value is None or isinstance(value, dict | list | tuple):
                continue
            if isinstance(value, str | int | float) and str(value).strip("'\"") in message:
                continue  # already said
            if len(extras) == _CONTEXT_MAX_ITEMS:
                break
            extras.append(f"{key}={_short(value)}")
        for attr in ("step", "error_class"):
            value = getattr(exc, attr, None)
            if value:
                extras.append(f"{attr}={_short(value)}")
        stderr = getattr(exc, "stderr", None)
        if isinstance(stderr, str) and stderr.strip():
            extras.append(f"stderr: {_short(stderr.strip().splitlines()[-1])}")
        if isinstance(exc, SandboxTransientError):
            extras.append("transient: safe to retry")
        elif isinstance(exc, CommunicationOutcomeUnknownError):
            extras.append("the program may have run")
    tail = f" [{', '.join(extras)}]" if extras else ""
    return f"{type(exc).__name__}: {message}{tail}"


def error_json(exc: BaseException, code: int) -> dict[str, Any]:
    context = exc.context if isinstance(exc, SandboxError) else {}
    return {
        "error": {
            "type": type(exc).__name__,
            "message": str(exc),
            "context": json.loads(json.dumps(context, default=str)),
            "retryable": isinstance(exc, SandboxTransientError),
        },
        "sbx_exit_code": code,
    }
