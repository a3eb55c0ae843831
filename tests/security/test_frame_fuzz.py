"""Attack: a hostile guest agent sends arbitrary bytes on the agent channel.

The host's frame decoder (:class:`FrameDecoder`) and message parser (:func:`parse_guest_message`)
are fuzzed with Hypothesis: random bytes, truncated frames, oversized length prefixes, JSON of the
wrong type and valid frames with wrong field types. Whatever arrives, the only exception is the typed
:class:`FrameError` (a :class:`GuestProtocolError`, never the caller's ``SandboxInputError``), and
the decoder never holds more than one frame plus the last fed chunk - a 4 GiB length prefix
allocates nothing.
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exec_sandbox.errors import GuestProtocolError, SandboxInputError
from exec_sandbox.protocol import agent as ap

SMALL_CAP = 64 * 1024  # a small frame cap keeps the fuzzer fast; the rules are the same
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_GUEST_TYPES = ["hello", "output", "exit", "warmup_result", "write_result", "file_chunk", "read_result",
                "list_result", "reseed_result", "cancel_result", "shutdown_result", "error", "log", ""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def header(length: int, *, magic: bytes = ap.MAGIC, version: int = ap.PROTOCOL_VERSION) -> bytes:
    return magic + bytes([version]) + length.to_bytes(4, "big")


def frame(body: bytes) -> bytes:
    return header(len(body)) + body


def _feed_all(decoder: ap.FrameDecoder, data: bytes, cut: list[int]) -> list[bytes]:
    """Feed ``data`` in pieces split at ``cut``; every payload is parsed; FrameError ends it."""
    out: list[bytes] = []
    pieces: list[bytes] = []
    last = 0
    for pos in [*sorted({min(c, len(data)) for c in cut}), len(data)]:
        pieces.append(data[last:pos])
        last = pos
    for piece in pieces:
        out.extend(decoder.feed(piece))
        # Bounded: never more than one frame's worth plus the chunk just fed.
        assert decoder.buffered <= ap.HEADER_LEN + decoder.max_frame_bytes + len(piece)
    for payload in out:
        assert len(payload) <= decoder.max_frame_bytes
        try:
            msg = ap.parse_guest_message(payload)
        except ap.FrameError as exc:
            assert isinstance(exc, GuestProtocolError) and exc.reason == "bad_frame"
            continue
        assert msg.type in _GUEST_TYPES
    return out


def _only_typed_errors(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except ap.FrameError as exc:
        assert isinstance(exc, GuestProtocolError)
        assert not isinstance(exc, SandboxInputError)
        assert exc.reason == "bad_frame"


@FUZZ
@given(data=st.binary(max_size=4096), cut=st.lists(st.integers(0, 4096), max_size=6),
       resync=st.booleans())
def test_random_bytes_raise_only_frame_error(data: bytes, cut: list[int], resync: bool) -> None:
    decoder = ap.FrameDecoder(max_frame_bytes=SMALL_CAP, resync=resync)
    _only_typed_errors(_feed_all, decoder, data, cut)


@FUZZ
@given(body=json_values, cut=st.lists(st.integers(0, 512), max_size=4), drop=st.integers(0, 64))
def test_truncated_and_wrong_type_json_frames(body: Any, cut: list[int], drop: int) -> None:
    raw = frame(json.dumps(body).encode())
    decoder = ap.FrameDecoder(max_frame_bytes=SMALL_CAP)
    data = raw[: max(0, len(raw) - drop)]  # possibly truncated: the rest never comes
    _only_typed_errors(_feed_all, decoder, data, cut)


@FUZZ
@given(kind=st.sampled_from(_GUEST_TYPES),
       fields=st.dictionaries(
           st.sampled_from(["id", "seq", "offset", "data", "sha256", "size", "chunks", "stream",
                            "exit_code", "timed_out", "duration_ms", "stdout_truncated",
                            "stderr_truncated", "stdout_bytes", "stderr_bytes", "code", "message",
                            "entries", "found", "instance", "max_frame_bytes", "boot"]),
           json_values, max_size=12))
def test_valid_frames_with_wrong_field_types(kind: str, fields: dict[str, Any]) -> None:
    payload = json.dumps({"type": kind, **fields}).encode()
    decoder = ap.FrameDecoder(max_frame_bytes=SMALL_CAP)
    _only_typed_errors(_feed_all, decoder, frame(payload), [])


@FUZZ
@given(length=st.integers(SMALL_CAP + 1, 2**32 - 1), tail=st.binary(max_size=256), resync=st.booleans())
def test_oversized_length_prefix_is_refused_before_any_allocation(length: int, tail: bytes,
                                                                  resync: bool) -> None:
    decoder = ap.FrameDecoder(max_frame_bytes=SMALL_CAP, resync=resync)
    try:
        out = decoder.feed(header(length) + tail)
    except ap.FrameError as exc:
        assert not resync
        assert "exceeds" in exc.message
        assert isinstance(exc, GuestProtocolError)
    else:
        assert resync  # resync mode skips the bad header instead of waiting for its payload
        assert all(len(p) <= SMALL_CAP for p in out)
    assert decoder.buffered <= ap.HEADER_LEN + len(tail)


@pytest.mark.parametrize("length", [2**32 - 1, 4 * 1024**3 - 8, 2 * 1024**3, ap.MAX_FRAME_BYTES + 1])
def test_a_4_gib_length_prefix_allocates_nothing(length: int) -> None:
    """The real cap (4 MiB): a 2/4 GiB prefix is refused at once, with under 64 KiB allocated."""
    decoder = ap.FrameDecoder()
    tracemalloc.start()
    try:
        with pytest.raises(ap.FrameError, match="exceeds") as info:
            decoder.feed(header(length) + b"{" * 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak
    assert isinstance(info.value, GuestProtocolError)
    assert info.value.context["head"].startswith(ap.MAGIC.hex())


def test_deeply_nested_and_huge_number_payloads_are_typed_errors() -> None:
    cases = [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"type":"output","id":"a","stream":"stdout","data":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"type":"file_chunk","id":"a","seq":' + b"9" * 100_000 + b',"offset":0,"data":"","sha256":"'
        + b"0" * 64 + b'"}',
        b'{"type":"exit","id":"a","exit_code":1e999999,"timed_out":false,"duration_ms":1,'
        b'"stdout_truncated":false,"stderr_truncated":false,"stdout_bytes":0,"stderr_bytes":0}',
        b"\xff\xfe" + "x".encode("utf-16"),
        b'{"type":"output","id":"a","stream":"stdout","data":"\\ud800"}',
        b"",
    ]
    for payload in cases:
        decoder = ap.FrameDecoder()
        try:
            for body in decoder.feed(frame(payload)):
                ap.parse_guest_message(body)
        except ap.FrameError as exc:
            assert isinstance(exc, GuestProtocolError)


@pytest.mark.parametrize("item", ["{}", "[]", '""', "0", '{"name":"","is_dir":false,"size":0}'])
def test_a_frame_of_many_tiny_values_is_refused_before_parsing(item: str) -> None:
    """A JSON parser spends ~150-250 bytes per value: one 4 MiB frame of ``[{},{},...]`` cost
    +190 MiB of host RSS to parse before the fix. Now it is counted (linear, no allocation per
    value) and refused before parsing."""
    from tests.support.memory import MIB, RssPeak

    n = (ap.MAX_FRAME_BYTES - 100) // (len(item) + 1)
    payload = ('{"type":"output","id":"a","stream":"stdout","data":"x","junk":['
               + ",".join([item] * n) + "]}").encode()
    assert len(payload) <= ap.MAX_FRAME_BYTES
    decoder = ap.FrameDecoder()
    with RssPeak() as mem:
        [body] = decoder.feed(frame(payload))
        with pytest.raises(ap.FrameError, match="JSON values exceeds"):
            ap.parse_guest_message(body)
    assert mem.growth < 16 * MIB, str(mem)


def test_escaped_quotes_do_not_hide_values() -> None:
    many = ",".join(["{}"] * (ap.MAX_JSON_TOKENS + 10))
    for text in (f'["\\\\",{many}]', f'["\\"",{many}]', f'["a\\\\\\"b",{many}]'):
        assert json.loads(text)  # valid JSON: the escapes end where the string really ends
        assert ap.json_token_count(text.encode()) > ap.MAX_JSON_TOKENS
    inside = '["' + "{},"  * (ap.MAX_JSON_TOKENS + 10) + '"]'  # all inside one string: one value
    assert ap.json_token_count(inside.encode()) <= 3


def test_guest_lists_are_capped_and_guest_texts_clipped() -> None:
    """Under the value cap, each list the guest sends has its own cap (a 10,000-entry listing at
    most; 64 capabilities...), and the text of a guest error is clipped before it reaches an error."""
    entries = [{"name": "", "is_dir": False, "size": 0}] * (ap.MAX_LIST_ENTRIES + 1)
    listing = json.dumps({"type": "list_result", "id": "a", "entries": entries},
                         separators=(",", ":")).encode()
    assert ap.json_token_count(listing) <= ap.MAX_JSON_TOKENS
    hello = json.dumps({"type": "hello", "id": None, "agent_version": "x", "protocol_version": 1,
                        "capabilities": [""] * (ap.MAX_GUEST_LIST + 1), "languages": [], "instance": "i",
                        "pid": 1, "uid": 0, "workdir": "/", "max_frame_bytes": 1, "boot": {}}).encode()
    for payload in (listing, hello):
        with pytest.raises(ap.FrameError, match="at most"):
            ap.parse_guest_message(payload)
    ok = [{"name": f"f{i}", "is_dir": False, "is_symlink": False, "size": i}
          for i in range(ap.MAX_LIST_ENTRIES)]
    parsed = ap.parse_guest_message(json.dumps({"type": "list_result", "id": "a", "entries": ok}).encode())
    assert isinstance(parsed, ap.ListResult) and len(parsed.entries) == ap.MAX_LIST_ENTRIES
    error = ap.parse_guest_message(json.dumps({"type": "error", "id": "a", "code": "c",
                                               "message": "m" * (3 * 1024 * 1024)}).encode())
    assert isinstance(error, ap.ErrorReply) and len(error.message) <= ap.MAX_GUEST_TEXT + 10
