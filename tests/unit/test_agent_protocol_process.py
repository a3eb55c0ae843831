"""The background-process and watch messages of the agent protocol: parsed and refused like the rest."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from exec_sandbox.protocol.agent import FrameError, parse_guest_message
from exec_sandbox.protocol.process import ProcExit, ProcOutput, ProcStartRequest, WatchEvents


def _parse(msg: dict[str, object]) -> object:
    return parse_guest_message(json.dumps(msg).encode())


def test_process_events_parse() -> None:
    out = _parse({"type": "proc_output", "id": "r1", "stream": "pty", "data": "aGk="})
    assert isinstance(out, ProcOutput) and out.stream == "pty"
    done = _parse({"type": "proc_exit", "id": "r1", "pid": 7, "exit_code": 137, "signal": 9, "killed": True,
                   "timed_out": False, "stdout_bytes": 3, "stderr_bytes": 0, "truncated": ["stdout"]})
    assert isinstance(done, ProcExit) and done.killed and done.truncated == ["stdout"]
    events = _parse({"type": "watch_events", "id": "w", "events": [{"name": "a/b", "type": "rename"}]})
    assert isinstance(events, WatchEvents) and events.events[0].name == "a/b"


@pytest.mark.parametrize("msg", [
    {"type": "proc_output", "id": "r", "stream": "stdin", "data": ""},  # no such stream
    {"type": "proc_exit", "id": "r", "pid": 1, "exit_code": 0, "stdout_bytes": -1, "stderr_bytes": 0},
    {"type": "watch_events", "id": "w", "events": [{"name": "x", "type": "create"}] * 1025},
    {"type": "watch_events", "id": "w", "events": [{"name": "x", "type": "open"}]},
])
def test_bad_guest_messages_are_frame_errors(msg: dict[str, object]) -> None:
    with pytest.raises(FrameError):
        _parse(msg)


def test_start_request_checks_its_arguments() -> None:
    ok = ProcStartRequest(id="r", argv=["sh", "-c", "true"], max_output_bytes=10, pty={"rows": 2, "cols": 3})
    assert ok.pty is not None and (ok.pty.rows, ok.pty.cols) == (2, 3)
    for bad in ({"argv": []}, {"argv": [""]}, {"argv": ["a\x00b"]}, {"argv": ["x"], "timeout_s": 0},
                {"argv": ["x"], "pty": {"rows": 0, "cols": 1}}, {"argv": ["x"], "max_output_bytes": -1}):
        with pytest.raises(ValidationError):
            ProcStartRequest(id="r", **{"max_output_bytes": 1, **bad})  # type: ignore[arg-type]
