"""The guest agent's JSON codec (driven on _json directly, so the agent never imports json/re/enum at
boot) must produce and accept exactly what the stdlib json module does."""

from __future__ import annotations

import json
import math

import pytest

from tests.support.guest_agent import load_agent

agent = load_agent("sbx_guest_agent_json_test")

VALUES: list[object] = [
    {},
    [],
    {"type": "hello", "id": None, "ok": True, "no": False, "n": 0, "big": 10**40, "neg": -7},
    {"floats": [0.1, -0.0, 1e300, 5e-324, 1.5]},
    {"text": "plain", "esc": "quote\" back\\ nl\n tab\t nul\x00 ctl\x1f", "uni": "é漢字\u2028\U0001f600"},
    {"nested": {"a": [{"b": [[], {}]}], "c": {"d": None}}},
    ["list", 1, None, {"k": "v"}],
    "a top-level string",
    42,
]


@pytest.mark.parametrize("value", VALUES)
def test_dumps_matches_stdlib(value: object) -> None:
    assert agent.json_dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert agent.json_dumps(value, ascii=True) == json.dumps(value)


@pytest.mark.parametrize("value", VALUES)
def test_loads_matches_stdlib(value: object) -> None:
    compact = json.dumps(value)
    texts = (compact, json.dumps(value, ensure_ascii=False, indent=2), f" \t\n{compact}\r\n")
    for text in texts:
        assert agent.json_loads(text) == json.loads(text)


def test_non_finite_numbers_like_stdlib() -> None:
    assert agent.json_dumps([math.inf, -math.inf]) == "[Infinity,-Infinity]"
    assert math.isnan(agent.json_loads("NaN"))
    assert agent.json_loads('{"x": -Infinity}') == {"x": -math.inf}


@pytest.mark.parametrize(
    "text",
    ["", " ", "{", "}", "[1,]", '{"a":1,}', "nul", "{}x", '{"a":1}{"b":2}', "'single'", '"\\x"', "[1 2]"],
)
def test_loads_rejects_what_stdlib_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        agent.json_loads(text)


def test_dumps_rejects_unserializable_values() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        agent.json_dumps({"x": object()})
    # the failed call leaves no state behind: the same shape encodes afterwards
    value = {"x": [1, {"y": 2}]}
    assert agent.json_dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_frames_round_trip_through_the_decoder() -> None:
    msgs = [{"type": "ping", "id": "1"}, {"type": "exec", "id": "2", "code": "print('é')\n"}]
    data = b"".join(agent.encode_frame(m) for m in msgs)
    decoder = agent.Decoder()
    assert decoder.feed(data[:5]) == []
    assert decoder.feed(data[5:]) == msgs
    bad = agent.MAGIC + bytes([agent.PROTOCOL_VERSION]) + (3).to_bytes(4, "big") + b"[1]"
    assert decoder.feed(bad) == [{"type": "__invalid__", "id": None}]
    broken = agent.MAGIC + bytes([agent.PROTOCOL_VERSION]) + (2).to_bytes(4, "big") + b"{x"
    assert decoder.feed(broken) == [{"type": "__invalid__", "id": None}]
