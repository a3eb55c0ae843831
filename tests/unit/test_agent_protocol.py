"""Frame codec and message models of the guest agent protocol (no processes)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from exec_sandbox.errors import GuestAgentError
from exec_sandbox.protocol import agent as ap
from tests.support.guest_agent import load_agent


@pytest.fixture(scope="module")
def agent_mod() -> ModuleType:
    return load_agent("sbx_guest_agent_under_test")


def _hello(**over: object) -> dict[str, object]:
    msg: dict[str, object] = {
        "type": "hello", "id": None, "agent_version": "1.0.0", "protocol_version": 1,
        "capabilities": ["ping"], "languages": ["python"], "instance": "abc", "pid": 1, "uid": 0,
        "workdir": "/home/sandbox", "max_frame_bytes": ap.MAX_FRAME_BYTES, "boot": {"is_pid1": True},
    }
    msg.update(over)
    return msg


def test_frame_layout_is_magic_version_length_json() -> None:
    frame = ap.encode_frame({"type": "ping", "id": "1"})
    body = b'{"type":"ping","id":"1"}'
    assert frame == b"SBX\x01" + len(body).to_bytes(4, "big") + body


def test_decoder_handles_frames_split_at_every_byte() -> None:
    frames = ap.encode_frame({"a": 1}) + ap.encode_frame({"b": "é" * 10})
    dec = ap.FrameDecoder()
    got: list[bytes] = []
    for i in range(len(frames)):
        got += dec.feed(frames[i:i + 1])
    assert [json.loads(p) for p in got] == [{"a": 1}, {"b": "é" * 10}]
    assert dec.buffered == 0


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"XYZ\x01\x00\x00\x00\x02{}", "magic"),
        (b"SBX\x07\x00\x00\x00\x02{}", "version"),
        (b"SBX\x01" + (ap.MAX_FRAME_BYTES + 1).to_bytes(4, "big"), "exceeds"),
    ],
)
def test_strict_decoder_rejects_bad_headers(data: bytes, needle: str) -> None:
    with pytest.raises(ap.FrameError, match=needle) as info:
        ap.FrameDecoder().feed(data)
    assert isinstance(info.value, GuestAgentError)


def test_resync_decoder_skips_garbage_until_magic() -> None:
    dec = ap.FrameDecoder(resync=True)
    out = dec.feed(b"\x00garbage SB" + ap.encode_frame({"ok": True}))
    assert [json.loads(p) for p in out] == [{"ok": True}]
    assert dec.skipped_bytes == len(b"\x00garbage SB")


def test_encode_refuses_oversize_frames() -> None:
    with pytest.raises(ap.FrameError, match="exceeds"):
        ap.encode_frame({"data": "x" * 100}, max_frame_bytes=50)


def test_parse_hello_and_events() -> None:
    hello = ap.parse_guest_message(json.dumps(_hello()).encode())
    assert isinstance(hello, ap.Hello) and hello.boot.is_pid1
    out = ap.parse_guest_message(b'{"type":"output","id":"r1","stream":"stderr","data":"x"}')
    assert isinstance(out, ap.OutputEvent) and out.stream == "stderr"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        b'{"type":"nonsense","id":"1"}',
        b'{"type":"output","id":"1","stream":"stdin","data":"x"}',
        b'{"type":"exit","id":"1","exit_code":0}',
        b'{"type":"write_result","id":"1","size":-1,"sha256":"' + b"0" * 64 + b'"}',
    ],
)
def test_invalid_guest_messages_raise_frame_error(payload: bytes) -> None:
    with pytest.raises(ap.FrameError):
        ap.parse_guest_message(payload)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("env", {"1BAD": "x"}),
        ("env", {"A=B": "x"}),
        ("env", {"OK": "a\x00b"}),
        ("code", "print(1)\x00"),
        ("code", "x" * (ap.MAX_CODE_BYTES + 1)),
        ("timeout_s", 0),
        ("language", "ruby"),
    ],
)
def test_exec_request_validation(field: str, value: object) -> None:
    fields: dict[str, object] = {"id": "1", "language": "python", "code": "print(1)"}
    fields[field] = value
    with pytest.raises(ValueError):
        ap.ExecRequest.model_validate(fields)


def test_requests_forbid_unknown_fields() -> None:
    with pytest.raises(ValueError):
        ap.PingRequest.model_validate({"id": "1", "extra": 1})


def test_guest_agent_constants_match_host(agent_mod: ModuleType) -> None:
    assert agent_mod.MAGIC == ap.MAGIC
    assert agent_mod.PROTOCOL_VERSION == ap.PROTOCOL_VERSION
    assert agent_mod.MAX_FRAME_BYTES == ap.MAX_FRAME_BYTES
    assert agent_mod.HEADER_LEN == ap.HEADER_LEN
    assert agent_mod.DEFAULT_PORT_NAME == ap.DEFAULT_PORT_NAME


def test_guest_frames_decode_on_host_and_back(agent_mod: ModuleType) -> None:
    frame = agent_mod.encode_frame(_hello(id="x1"))
    (payload,) = ap.FrameDecoder().feed(frame)
    assert isinstance(ap.parse_guest_message(payload), ap.Hello)
    request = ap.ExecRequest(id="r", language="raw", code="echo hi", env={"A": "1"})
    dec = agent_mod.Decoder()
    assert dec.feed(b"junk" + ap.encode_request(request)) == [request.model_dump(mode="json")]


def test_guest_decoder_flags_non_object_json(agent_mod: ModuleType) -> None:
    assert agent_mod.Decoder().feed(ap.encode_frame({"a": 1})[:8] + b'{"a":1}') == [{"a": 1}]
    bad = b"SBX\x01" + (3).to_bytes(4, "big") + b"[1]"
    assert agent_mod.Decoder().feed(bad) == [{"type": "__invalid__", "id": None}]


@pytest.mark.parametrize(
    ("path", "code"),
    [("../x", "path_refused"), ("a/../../x", "path_refused"), ("/etc/passwd", "path_refused"),
     ("", "invalid_path"), ("a\x00b", "invalid_path")],
)
def test_guest_path_rules(agent_mod: ModuleType, tmp_path: Path, path: str, code: str) -> None:
    args = agent_mod.parse_args(["--workdir", str(tmp_path), "--no-drop-privileges"])
    agent = agent_mod.Agent(args)
    with pytest.raises(agent_mod.RequestError) as info:
        agent._parts(path, allow_root=False)
    assert info.value.code == code


def test_guest_path_rules_accept_paths_inside(agent_mod: ModuleType, tmp_path: Path) -> None:
    args = agent_mod.parse_args(["--workdir", str(tmp_path), "--no-drop-privileges"])
    agent = agent_mod.Agent(args)
    real = str(tmp_path.resolve())
    assert agent._parts("a/./b//c", allow_root=False) == ["a", "b", "c"]
    assert agent._parts(f"{real}/d/e", allow_root=False) == ["d", "e"]
    assert agent._parts(".", allow_root=True) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--unix-listen", "/tmp/x.sock", "--workdir", "/w", "--run-as-uid", "1000", "--warm", "python",
         "--warm=raw", "--shutdown-action", "exit"],
        ["--device=/dev/vport0p1", "--no-drop-privileges", "--rundir", "/run/sbx", "--home", "/h"],
        [],
    ],
)
def test_fast_argument_parser_matches_argparse(agent_mod: ModuleType, argv: list[str]) -> None:
    fast = agent_mod._fast_parse(argv)
    slow = agent_mod._argparse(argv)
    assert fast is not None
    fields = [k for k in vars(agent_mod.Args) if not k.startswith("_")]
    assert {k: getattr(fast, k) for k in fields} == {k: getattr(slow, k) for k in fields}


@pytest.mark.parametrize(
    "argv",
    [["--bogus"], ["--run-as-uid", "x"], ["--warm", "ruby"], ["--unix-listen", "a", "--unix-connect", "b"],
     ["--workdir"]],
)
def test_fast_argument_parser_defers_unusual_input(agent_mod: ModuleType, argv: list[str]) -> None:
    assert agent_mod._fast_parse(argv) is None


def test_agent_flags_from_the_kernel_command_line(agent_mod: ModuleType) -> None:
    cmdline = ("console=ttyS0 quiet sbx.agent=--spare=python,--warm=raw reboot=t "
               "sbx.agent=--max-user-processes=64\n")
    flags = agent_mod.cmdline_flags(cmdline)
    assert flags == ["--spare=python", "--warm=raw", "--max-user-processes=64"]
    args = agent_mod.parse_args(flags)
    assert (args.spare, args.warm, args.max_user_processes) == (["python"], ["raw"], 64)
