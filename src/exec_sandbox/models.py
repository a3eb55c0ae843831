"""Public result and value models of :mod:`exec_sandbox` (pure data, no I/O).

``ExecutionResult`` is what ``Scheduler.run`` and ``Session.exec`` return; ``TimingBreakdown`` says
where the time went; ``FileInfo`` is one entry of ``Session.list_files``; ``PortForward`` is one
host -> guest port forward. ``Language`` is the same literal the guest agent protocol uses.
"""

from __future__ import annotations

import ipaddress
from pathlib import PurePath
from typing import Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from exec_sandbox.errors import SandboxInputError
from exec_sandbox.protocol.agent import Language

__all__ = [
    "LANGUAGES",
    "LANGUAGE_EXTENSIONS",
    "TIMEOUT_EXIT_CODE",
    "Accelerator",
    "ExecutionResult",
    "FileInfo",
    "Language",
    "PortForward",
    "TimingBreakdown",
    "language_from_path",
]

LANGUAGES: Final[tuple[Language, ...]] = get_args(Language)

# Used by the CLI to pick a language from a file name; lower-cased suffix -> language.
LANGUAGE_EXTENSIONS: Final[dict[str, Language]] = {
    ".py": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".sh": "raw",
}

# The documented exit code of a run that hit its timeout (the real one is unknowable: we killed it).
TIMEOUT_EXIT_CODE: Final = -1

Accelerator = Literal["tcg", "kvm"]

_Ms = float  # readability only: every *_ms field is milliseconds, >= 0


def language_from_path(path: str | PurePath) -> Language:
    """The language for a source file name, by extension (``.py``, ``.js``/``.mjs``/``.cjs``, ``.sh``)."""
    suffix = PurePath(path).suffix.lower()
    try:
        return LANGUAGE_EXTENSIONS[suffix]
    except KeyError:
        known = ", ".join(sorted(LANGUAGE_EXTENSIONS))
        raise SandboxInputError(
            f"cannot tell the language of {str(path)!r} from its extension (known: {known}); "
            "pass the language explicitly",
            context={"field": "language", "value": str(path)[:200], "extension": suffix},
        ) from None


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TimingBreakdown(_Frozen):
    """Where the wall-clock time of one run went, in milliseconds.

    Phases that did not happen are 0 (or ``None`` for ``restore_ms``: "no restore" differs from
    "a restore that took 0 ms"). ``total_ms`` is measured end to end, so it is at least the sum of
    the phases it contains but may be larger (bookkeeping between phases is not itemised).
    """

    admission_wait_ms: _Ms = Field(default=0.0, ge=0)
    setup_ms: _Ms = Field(default=0.0, ge=0, description="host-side preparation before the VM starts")
    overlay_ms: _Ms = Field(default=0.0, ge=0, description="getting the qcow2 overlay")
    boot_ms: _Ms = Field(default=0.0, ge=0, description="VM start to guest agent answering (cold boot)")
    restore_ms: _Ms | None = Field(default=None, ge=0, description="snapshot restore to agent answering")
    connect_ms: _Ms = Field(default=0.0, ge=0, description="connecting to the guest agent")
    execute_ms: _Ms = Field(default=0.0, ge=0, description="the code's own run inside the guest")
    teardown_ms: _Ms = Field(default=0.0, ge=0)
    total_ms: _Ms = Field(ge=0)


class ExecutionResult(_Frozen):
    """The outcome of one ``run()`` / ``exec()``.

    A timed-out run has ``timed_out=True`` and ``exit_code == -1`` (:data:`TIMEOUT_EXIT_CODE`).
    ``signal`` is set when the program died from a signal (``exit_code`` is then 128 + signal).
    """

    stdout: str
    stderr: str
    exit_code: int
    execution_time_ms: _Ms = Field(ge=0)
    timing: TimingBreakdown
    language: Language
    timed_out: bool = False
    signal: int | None = Field(default=None, ge=1, le=64)
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    vm_id: str | None = None
    accelerator: Accelerator | None = None
    warm_pool_hit: bool = False
    restored_from_snapshot: bool = False
    memory_peak_mb: float | None = Field(default=None, ge=0)
    oom_killed: bool = False
    # CPU the VM's QEMU process used during this call, measured on the host (/proc), all vCPUs.
    cpu_seconds: float | None = Field(default=None, ge=0)
    # The guest did not answer by the host's deadline (timeout + a short grace): the host ended the
    # run itself (``timed_out``) and destroyed the VM (a session is closed).
    guest_unresponsive: bool = False

    @model_validator(mode="after")
    def _timeout_exit_code(self) -> ExecutionResult:
        if self.timed_out and self.exit_code != TIMEOUT_EXIT_CODE:
            raise ValueError(
                f"a timed-out result must have exit_code {TIMEOUT_EXIT_CODE}, not {self.exit_code}"
            )
        return self

    @property
    def success(self) -> bool:
        """True when the program ran to completion and exited 0."""
        return self.exit_code == 0 and not self.timed_out and not self.oom_killed


class FileInfo(_Frozen):
    """One directory entry inside the sandbox work dir."""

    name: str = Field(min_length=1)
    is_dir: bool
    size: int = Field(ge=0)
    is_symlink: bool = False


class PortForward(_Frozen):
    """Forward ``host_addr:host_port`` on the host to ``guest_port`` in the guest.

    ``host_port`` 0 asks the OS for a free port (the Scheduler reports the one it got).
    ``host_addr`` defaults to loopback; binding elsewhere exposes the sandbox to the network.
    """

    guest_port: int = Field(ge=1, le=65535)
    host_port: int = Field(default=0, ge=0, le=65535)
    host_addr: str = "127.0.0.1"
    protocol: Literal["tcp", "udp"] = "tcp"

    @field_validator("host_addr")
    @classmethod
    def _ip_literal(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"host_addr must be an IP address literal, not {v[:100]!r}") from None
