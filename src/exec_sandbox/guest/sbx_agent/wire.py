"""Frames between agent and host: ``b"SBX" + version | u32 length | JSON``, byte-compatible with
the host's ``exec_sandbox.agent_protocol``; constants and the error type shared by the agent."""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: the guest must not pay for importing typing at boot
    from typing import Any

    Msg = dict[str, Any]

AGENT_VERSION = "1.0.0"
PROTOCOL_VERSION = 1
MAGIC = b"SBX"
HEADER_LEN = 8
MAX_FRAME_BYTES = 4 * 1024 * 1024
DEFAULT_PORT_NAME = "org.exec_sandbox.agent"
MAX_CODE_BYTES = 2 * 1024 * 1024
MAX_CHUNK_BYTES = 2 * 1024 * 1024
DEFAULT_OUTPUT_CAP = 10 * 1024 * 1024
READ_CHUNK = 64 * 1024
# A listing sends at most this many entries (the first ones by name); the host refuses more.
MAX_LIST_ENTRIES = 10_000
CAPABILITIES = [
    "ping",
    "exec",
    "exec.session",
    "warmup",
    "write_file",
    "read_file",
    "list_files",
    "reseed_rng",
    "net_config",
    "cancel",
    "shutdown",
    "process",
    "watch",
]
LANG_EXT = {"python": "py", "javascript": "js", "raw": "sh"}
BOOT_MONO = time.monotonic()
# Boot tracing (guest init sets SBX_TRACE for the kernel argument sbx.trace): /proc/uptime stamps of
# the agent's start-up on stderr, which is the console when the agent is PID 1. Off by default.
TRACE = os.environ.get("SBX_TRACE") == "1"


def trace(what: str) -> None:
    if TRACE:
        try:
            with open("/proc/uptime") as fh:
                up = fh.read().split()[0]
        except OSError:
            up = "?"
        print(f"sbx-trace {up} agent: {what}", file=sys.stderr, flush=True)


class RequestError(Exception):
    """A request failed in a way reported to the host as an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- JSON
#
# The json package imports re (which imports enum) and compiles regexes at import: ~250 ms of every
# cold boot under TCG. Its C accelerator _json does the real work without either, so the agent
# drives it directly: json_dumps(x) == json.dumps(x, separators=(",", ":"), ensure_ascii=False),
# json_dumps(x, ascii=True) == json.dumps(x), and json_loads is json.loads (errors: ValueError).


class _ScanContext:
    """The attributes _json.make_scanner reads (those of a default json.JSONDecoder)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def _not_serializable(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


try:
    import _json

    _scan_once = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # it reads attributes

    def json_dumps(obj: object, *, ascii: bool = False) -> str:
        # A fresh encoder per call: its circular-reference memo is not reset after an error.
        encoder = _json.make_encoder({}, _not_serializable,
                                     _json.encode_basestring_ascii if ascii else _json.encode_basestring,
                                     None, ":" if not ascii else ": ", "," if not ascii else ", ",
                                     False, False, True)
        return "".join(encoder(obj, 0))

    def json_loads(text: str) -> object:
        n = len(text)
        i = 0
        while i < n and text[i] in " \t\n\r":
            i += 1
        try:
            obj, end = _scan_once(text, i)
        except StopIteration:
            raise ValueError("Expecting value") from None
        while end < n and text[end] in " \t\n\r":
            end += 1
        if end != n:
            raise ValueError("Extra data")
        return obj

except (ImportError, AttributeError):  # pragma: no cover - CPython always has _json
    import json as _json_mod

    def json_dumps(obj: object, *, ascii: bool = False) -> str:
        if ascii:
            return _json_mod.dumps(obj)
        return _json_mod.dumps(obj, separators=(",", ":"), ensure_ascii=False)

    def json_loads(text: str) -> object:
        return _json_mod.loads(text)


# --------------------------------------------------------------------------- framing


def encode_frame(msg: Msg) -> bytes:
    payload = json_dumps(msg).encode()
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError("frame too large")
    return MAGIC + bytes([PROTOCOL_VERSION]) + len(payload).to_bytes(4, "big") + payload


class Decoder:
    """Incremental frame decoder that resynchronises on the magic after garbage."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def reset(self) -> None:
        self.buf.clear()

    def feed(self, data: bytes) -> list[Msg]:
        self.buf += data
        out: list[Msg] = []
        while True:
            if len(self.buf) < HEADER_LEN:
                if self.buf and not MAGIC.startswith(bytes(self.buf[:3])):
                    self._skip()
                    continue
                return out
            if self.buf[:3] != MAGIC or self.buf[3] != PROTOCOL_VERSION:
                self._skip()
                continue
            n = int.from_bytes(self.buf[4:8], "big")
            if n > MAX_FRAME_BYTES:
                self._skip()
                continue
            if len(self.buf) < HEADER_LEN + n:
                return out
            payload = bytes(self.buf[HEADER_LEN : HEADER_LEN + n])
            del self.buf[: HEADER_LEN + n]
            try:
                msg = json_loads(payload.decode("utf-8", "surrogatepass"))
            except (ValueError, RecursionError):
                msg = None
            if not isinstance(msg, dict):
                out.append({"type": "__invalid__", "id": None})
            else:
                out.append(msg)

    def _skip(self) -> None:
        # Drop one byte, then everything up to the next possible magic.
        idx = self.buf.find(MAGIC, 1)
        del self.buf[: idx if idx > 0 else max(1, len(self.buf) - 2)]


class Args:
    """Command-line options (see ``--help``)."""

    port_name: str = DEFAULT_PORT_NAME
    device: str | None = None
    unix_connect: str | None = None
    unix_listen: str | None = None
    workdir: str = "/home/sandbox"
    home: str | None = None
    user_name: str = "sandbox"
    run_as_uid: int | None = None
    run_as_gid: int | None = None
    no_drop_privileges: bool = False
    rundir: str | None = None
    python: str | None = None
    node: str | None = None
    shell: str | None = None
    warm: list[str] | None = None
    shutdown_action: str | None = None
    max_user_processes: int = 256
    spare: list[str] | None = None
