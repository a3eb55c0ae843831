"""Agent protocol messages of background processes and directory watches (host side; the guest's
are ``proc_ops`` and ``watch_ops``).

Host -> guest: ``proc_start`` (its id names the process's stream for the process's life),
``proc_input``, ``proc_close_stdin``, ``proc_resize``, ``proc_signal``; a ``cancel`` whose target is
the ``proc_start`` id kills the process. Guest -> host: ``proc_started`` (the guest pid), then
``proc_output`` (base64 bytes; stream ``pty`` for a terminal) and a final ``proc_exit``, all with the
``proc_start`` id; ``proc_ack`` answers the others. ``watch_dir`` -> ``watch_started``, then
``watch_events`` batches until a ``cancel`` (or a final ``watch_end``: the directory went away). Kept
apart from :mod:`.agent` (which puts these
into its unions) to keep both modules small.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MAX_PROCESS_ARGS",
    "ProcAck",
    "ProcCloseStdinRequest",
    "ProcExit",
    "ProcInputRequest",
    "ProcOutput",
    "ProcResizeRequest",
    "ProcSignalRequest",
    "ProcStartRequest",
    "ProcStarted",
    "PtySize",
    "WatchDirRequest",
    "WatchEnd",
    "WatchEvent",
    "WatchEvents",
    "WatchStarted",
]

MAX_PROCESS_ARGS = 4096
_Id = Annotated[str, Field(min_length=1, max_length=128)]
_Dim = Annotated[int, Field(gt=0, le=10000)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PtySize(_Req):
    rows: _Dim
    cols: _Dim


class ProcStartRequest(_Req):
    type: Literal["proc_start"] = "proc_start"
    id: _Id
    argv: list[str] = Field(min_length=1, max_length=MAX_PROCESS_ARGS)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = Field(default=None, max_length=4096)
    root: bool = False
    stdin: bool = False
    pty: PtySize | None = None
    max_output_bytes: int = Field(ge=0)
    timeout_s: float | None = Field(default=None, gt=0, le=30 * 86400)

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        if not v[0] or any("\x00" in a for a in v):
            raise ValueError("argv[0] must be set and no argument may contain NUL")
        return v


class ProcInputRequest(_Req):
    type: Literal["proc_input"] = "proc_input"
    id: _Id
    pid: int
    data: str  # base64


class ProcCloseStdinRequest(_Req):
    type: Literal["proc_close_stdin"] = "proc_close_stdin"
    id: _Id
    pid: int


class ProcResizeRequest(_Req):
    type: Literal["proc_resize"] = "proc_resize"
    id: _Id
    pid: int
    rows: _Dim
    cols: _Dim


class ProcSignalRequest(_Req):
    type: Literal["proc_signal"] = "proc_signal"
    id: _Id
    pid: int
    signal: int = Field(gt=0, lt=65)


class ProcStarted(_Reply):
    type: Literal["proc_started"]
    id: str
    pid: int


class ProcOutput(_Reply):
    type: Literal["proc_output"]
    id: str
    stream: Literal["stdout", "stderr", "pty"]
    data: str  # base64


class ProcExit(_Reply):
    type: Literal["proc_exit"]
    id: str
    pid: int
    exit_code: int
    signal: int | None = None
    killed: bool = False
    timed_out: bool = False
    stdout_bytes: int = Field(ge=0)
    stderr_bytes: int = Field(ge=0)
    truncated: list[Literal["stdout", "stderr", "pty"]] = Field(default_factory=list, max_length=3)


class ProcAck(_Reply):
    type: Literal["proc_ack"]
    id: str


class WatchDirRequest(_Req):
    type: Literal["watch_dir"] = "watch_dir"
    id: _Id
    path: str = Field(min_length=1, max_length=4096)
    recursive: bool = False


class WatchStarted(_Reply):
    type: Literal["watch_started"]
    id: str


class WatchEvent(_Reply):
    name: str = Field(max_length=4096)
    type: Literal["create", "write", "remove", "rename", "chmod"]


class WatchEvents(_Reply):
    type: Literal["watch_events"]
    id: str
    events: list[WatchEvent] = Field(max_length=1024)


class WatchEnd(_Reply):
    type: Literal["watch_end"]
    id: str
    reason: str = Field(max_length=1024)
