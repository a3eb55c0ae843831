"""Sans-I/O codec and typed messages of the guest agent protocol (host side).

Frame layout (both directions)::

    offset 0  3 bytes  magic b"SBX"
    offset 3  1 byte   protocol version (1)
    offset 4  4 bytes  payload length, unsigned big-endian, <= MAX_FRAME_BYTES (4 MiB)
    offset 8  N bytes  payload: one UTF-8 JSON object with a "type" and an "id"

Every request carries a host-chosen string ``id``; every reply, event and error repeats it. The
guest sends ``hello`` unsolicited (``id`` null) on start and whenever it sees a (re)connecting host,
and as the answer to ``ping``. File data travels base64-encoded inside JSON (chunks <= 1 MiB raw by
default), each chunk and the whole file checked with sha256.

Host -> guest: ping, exec, warmup, write_file + write_chunk..., read_file, list_files, reseed_rng,
net_config, cancel, shutdown, and the background-process requests of :mod:`.process`. Guest -> host:
hello, output, exit, warmup_result, write_result, file_chunk, read_result, list_result, reseed_result,
net_result, cancel_result, shutdown_result, the process events of :mod:`.process`, error.

Everything the guest sends is validated here; anything malformed raises :class:`FrameError`
(a :class:`~exec_sandbox.errors.GuestProtocolError`). Nothing here allocates on the guest's word: a
length prefix is checked against the cap before a byte of the payload is awaited, and the decoder
never holds more than one frame (header + ``max_frame_bytes``) plus the last fed chunk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from exec_sandbox.errors import GuestProtocolError
from exec_sandbox.protocol.process import (
    ProcAck,
    ProcCloseStdinRequest,
    ProcExit,
    ProcInputRequest,
    ProcOutput,
    ProcResizeRequest,
    ProcSignalRequest,
    ProcStarted,
    ProcStartRequest,
    WatchDirRequest,
    WatchEnd,
    WatchEvents,
    WatchStarted,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_OUTPUT_CAP_BYTES",
    "DEFAULT_PORT_NAME",
    "GUEST_AGENT_PATH",
    "HEADER_LEN",
    "MAGIC",
    "MAX_CHUNK_BYTES",
    "MAX_CODE_BYTES",
    "MAX_ENV_VALUE_BYTES",
    "MAX_ENV_VARS",
    "MAX_FRAME_BYTES",
    "MAX_GUEST_LIST",
    "MAX_GUEST_TEXT",
    "MAX_JSON_TOKENS",
    "MAX_LIST_ENTRIES",
    "PROTOCOL_VERSION",
    "CancelRequest",
    "CancelResult",
    "ErrorReply",
    "ExecRequest",
    "ExitEvent",
    "FileChunk",
    "FileEntry",
    "FrameDecoder",
    "FrameError",
    "GuestMessage",
    "Hello",
    "HostRequest",
    "Language",
    "ListFilesRequest",
    "ListResult",
    "NetConfigRequest",
    "NetResult",
    "OutputEvent",
    "PingRequest",
    "ReadFileRequest",
    "ReadResult",
    "ReseedRequest",
    "ReseedResult",
    "ShutdownRequest",
    "ShutdownResult",
    "WarmupRequest",
    "WarmupResult",
    "WriteChunk",
    "WriteFileRequest",
    "WriteResult",
    "encode_frame",
    "encode_request",
    "json_token_count",
    "parse_guest_message",
]

#: The guest program (a stdlib-only package); image builds copy it to /opt/sbx/sbx_agent/.
GUEST_AGENT_PATH = Path(__file__).parent.parent / "guest" / "sbx_agent"

MAGIC = b"SBX"
PROTOCOL_VERSION = 1
HEADER_LEN = 8
MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_CODE_BYTES = 2 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 2 * 1024 * 1024
DEFAULT_OUTPUT_CAP_BYTES = 10 * 1024 * 1024
DEFAULT_PORT_NAME = "org.exec_sandbox.agent"
MAX_ENV_VARS = 256
MAX_ENV_VALUE_BYTES = 128 * 1024

Language = Literal["python", "javascript", "raw"]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

RequestId = Annotated[str, Field(min_length=1, max_length=128)]
#: Guest-sent lists are short (languages, capabilities, interpreters); a long one is an attack on
#: host memory (each parsed item costs ~10x its JSON size).
MAX_GUEST_LIST = 64
#: Entries of one directory listing the host accepts (~25 MiB transient to parse at worst).
MAX_LIST_ENTRIES = 10_000
#: Characters of a guest error code/message kept (the rest is cut; they end up in our errors).
MAX_GUEST_TEXT = 8192
_ShortList = Annotated[list[str], Field(max_length=MAX_GUEST_LIST)]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_GUEST_TEXT else text[:MAX_GUEST_TEXT] + "...[cut]"


GuestText = Annotated[str, AfterValidator(_clip)]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class FrameError(GuestProtocolError):
    """A frame or message broke the protocol (bad header, oversize, invalid JSON or schema)."""

    def __init__(self, message: str, *, context: dict[str, Any] | None = None) -> None:
        super().__init__(message, reason="bad_frame", context=context)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _GuestMsg(BaseModel):
    # The guest may add fields in later agent versions; the host ignores what it does not know.
    model_config = ConfigDict(extra="ignore", frozen=True)


# --------------------------------------------------------------------------- host -> guest


class PingRequest(_Msg):
    type: Literal["ping"] = "ping"
    id: RequestId


class ExecRequest(_Msg):
    type: Literal["exec"] = "exec"
    id: RequestId
    language: Language
    code: str
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(default=30.0, gt=0, le=86400)
    cwd: str | None = None
    session: bool = False
    max_stdout_bytes: int = Field(default=DEFAULT_OUTPUT_CAP_BYTES, ge=0)
    max_stderr_bytes: int = Field(default=DEFAULT_OUTPUT_CAP_BYTES, ge=0)
    # False: no further one-shot exec will follow (a single-use VM), so the agent does not start a
    # replacement spare interpreter - a few hundred ms of guest CPU and ~15 MiB of TCG code cache.
    # None (left out on the wire): the agent's default, refill.
    refill_spare: bool | None = None
    # True: a warm-up block of the host's own (never user code) run in the spare one-shot
    # interpreter, which is then kept instead of replaced: under TCG the block translates the
    # one-shot path ahead of the first real run, and a replacement would cost 250-700 ms of guest CPU.
    prime_spare: bool | None = None

    @field_validator("code")
    @classmethod
    def _code(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("code must not contain NUL")
        if len(v.encode()) > MAX_CODE_BYTES:
            raise ValueError(f"code is larger than {MAX_CODE_BYTES} bytes")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_ENV_VARS:
            raise ValueError(f"at most {MAX_ENV_VARS} environment variables")
        for name, value in v.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"invalid environment variable name {name!r}")
            if "\x00" in value:
                raise ValueError(f"environment variable {name!r} contains NUL")
            if len(value.encode()) > MAX_ENV_VALUE_BYTES:
                raise ValueError(f"environment variable {name!r} is larger than {MAX_ENV_VALUE_BYTES} bytes")
        return v


class WarmupRequest(_Msg):
    """Start interpreters ahead of use: the persistent session REPL (``session``) and/or a spare
    interpreter that the next one-shot exec consumes (``spare``; python and javascript only)."""

    type: Literal["warmup"] = "warmup"
    id: RequestId
    languages: list[Language]
    session: bool = True
    spare: bool = False


class WriteFileRequest(_Msg):
    type: Literal["write_file"] = "write_file"
    id: RequestId
    path: str = Field(min_length=1, max_length=4096)
    size: int = Field(ge=0)
    sha256: Sha256Hex
    make_executable: bool = False


class WriteChunk(_Msg):
    type: Literal["write_chunk"] = "write_chunk"
    id: RequestId
    seq: int = Field(ge=0)
    data: str  # base64
    sha256: Sha256Hex


class ReadFileRequest(_Msg):
    type: Literal["read_file"] = "read_file"
    id: RequestId
    path: str = Field(min_length=1, max_length=4096)
    chunk_size: int = Field(default=DEFAULT_CHUNK_BYTES, ge=1, le=MAX_CHUNK_BYTES)


class ListFilesRequest(_Msg):
    type: Literal["list_files"] = "list_files"
    id: RequestId
    path: str = Field(default=".", min_length=1, max_length=4096)


class ReseedRequest(_Msg):
    type: Literal["reseed_rng"] = "reseed_rng"
    id: RequestId
    seed: str  # base64 of 16..4096 bytes
    # The host's wall clock (ns since the epoch) when the request was built: a restored guest's
    # clock reads the snapshot's time, hours behind, and TLS then sees certificates "not yet valid".
    wall_time_ns: int | None = Field(default=None, ge=0)


class NetConfigRequest(_Msg):
    """Configure the guest NIC (after boot, restore and fork of a networked sandbox)."""

    type: Literal["net_config"] = "net_config"
    id: RequestId
    address: str = Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")
    prefix: int = Field(ge=8, le=30)
    mac: str | None = Field(default=None, pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
    nameserver: str = Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")
    ca_bundle: str | None = Field(default=None, max_length=2 * 1024 * 1024)


class CancelRequest(_Msg):
    type: Literal["cancel"] = "cancel"
    id: RequestId
    target: RequestId


class ShutdownRequest(_Msg):
    type: Literal["shutdown"] = "shutdown"
    id: RequestId


HostRequest = (
    PingRequest
    | ExecRequest
    | WarmupRequest
    | WriteFileRequest
    | WriteChunk
    | ReadFileRequest
    | ListFilesRequest
    | ReseedRequest
    | NetConfigRequest
    | CancelRequest
    | ShutdownRequest
    | ProcStartRequest
    | ProcInputRequest
    | ProcCloseStdinRequest
    | ProcResizeRequest
    | ProcSignalRequest
    | WatchDirRequest
)


# --------------------------------------------------------------------------- guest -> host


class BootInfo(_GuestMsg):
    uptime_s: float | None = None
    agent_uptime_s: float | None = None
    is_pid1: bool = False
    warm: _ShortList = Field(default_factory=list)
    spares: _ShortList = Field(default_factory=list)


class Hello(_GuestMsg):
    type: Literal["hello"]
    id: str | None = None
    agent_version: str
    protocol_version: int
    capabilities: _ShortList
    languages: _ShortList
    instance: str
    pid: int
    uid: int
    workdir: str
    max_frame_bytes: int
    boot: BootInfo


class OutputEvent(_GuestMsg):
    type: Literal["output"]
    id: str
    stream: Literal["stdout", "stderr"]
    data: str


class ExitEvent(_GuestMsg):
    type: Literal["exit"]
    id: str
    exit_code: int
    signal: int | None = None
    timed_out: bool
    cancelled: bool = False
    session_reset: bool = False
    duration_ms: float
    stdout_truncated: bool
    stderr_truncated: bool
    stdout_bytes: int
    stderr_bytes: int


class WarmupResult(_GuestMsg):
    type: Literal["warmup_result"]
    id: str
    ready: _ShortList
    errors: Annotated[dict[str, GuestText], Field(max_length=MAX_GUEST_LIST)] = Field(default_factory=dict)


class WriteResult(_GuestMsg):
    type: Literal["write_result"]
    id: str
    size: int = Field(ge=0)
    sha256: Sha256Hex


class FileChunk(_GuestMsg):
    type: Literal["file_chunk"]
    id: str
    seq: int = Field(ge=0)
    offset: int = Field(ge=0)
    data: str  # base64
    sha256: Sha256Hex


class ReadResult(_GuestMsg):
    type: Literal["read_result"]
    id: str
    size: int = Field(ge=0)
    chunks: int = Field(ge=0)
    sha256: Sha256Hex


class FileEntry(_GuestMsg):
    name: str
    is_dir: bool
    is_symlink: bool = False
    size: int = Field(ge=0)


class ListResult(_GuestMsg):
    type: Literal["list_result"]
    id: str
    entries: list[FileEntry] = Field(max_length=MAX_LIST_ENTRIES)
    #: The directory's real entry count when the agent sent only the first MAX_LIST_ENTRIES by name.
    truncated: int | None = Field(default=None, ge=0)


class ReseedResult(_GuestMsg):
    type: Literal["reseed_result"]
    id: str
    mixed_bytes: int
    credited_bits: int
    repls_reseeded: _ShortList = Field(default_factory=list)  # session interpreters
    spares_reseeded: _ShortList = Field(default_factory=list)  # spare one-shot interpreters
    clock_step_ms: float | None = None  # how far the guest clock was stepped (None: left alone)


class NetResult(_GuestMsg):
    type: Literal["net_result"]
    id: str
    interface: GuestText


class CancelResult(_GuestMsg):
    type: Literal["cancel_result"]
    id: str
    found: bool


class ShutdownResult(_GuestMsg):
    type: Literal["shutdown_result"]
    id: str
    action: str


class ErrorReply(_GuestMsg):
    type: Literal["error"]
    id: str | None = None
    code: GuestText
    message: GuestText


GuestMessage = Annotated[
    Hello
    | OutputEvent
    | ExitEvent
    | WarmupResult
    | WriteResult
    | FileChunk
    | ReadResult
    | ListResult
    | ReseedResult
    | NetResult
    | CancelResult
    | ShutdownResult
    | ProcStarted
    | ProcOutput
    | ProcExit
    | ProcAck
    | WatchStarted
    | WatchEvents
    | WatchEnd
    | ErrorReply,
    Field(discriminator="type"),
]
_GUEST_ADAPTER: TypeAdapter[GuestMessage] = TypeAdapter(GuestMessage)


# --------------------------------------------------------------------------- codec


def encode_frame(payload: dict[str, Any], *, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame for a JSON object; raises FrameError when it would exceed the cap."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > max_frame_bytes:
        raise FrameError(
            f"frame of {len(body)} bytes exceeds the {max_frame_bytes}-byte cap",
            context={"size": len(body), "max_frame_bytes": max_frame_bytes},
        )
    return MAGIC + bytes([PROTOCOL_VERSION]) + len(body).to_bytes(4, "big") + body


def encode_request(request: HostRequest, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    return encode_frame(request.model_dump(mode="json"), max_frame_bytes=max_frame_bytes)


#: JSON values one guest frame may hold (strings + separators + containers, an upper bound). A
#: JSON parser costs ~150-250 bytes of host memory per value whatever its size, so a 4 MiB frame of
#: ``[{},{},...]`` or ``["","",...]`` would cost ~190-230 MiB to parse; under this cap at most ~30
#: MiB. Legitimate frames need few (a file chunk or an output event: ~15; a listing of
#: MAX_LIST_ENTRIES entries: ~100,000).
MAX_JSON_TOKENS = 131_072
_KEEP = frozenset(b'",[{')
_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in _KEEP)


def json_token_count(payload: bytes) -> int:
    """An upper bound of the JSON values a parser would make of ``payload``, without parsing it.

    Linear time, no per-value allocation: escaped backslashes and quotes are dropped, everything
    but quotes and ``,[{`` is deleted, then strings (quote pairs) and the separators and containers
    outside strings are counted (values <= strings + commas + containers + 1).
    """
    quick = (payload.count(b",") + payload.count(b"[") + payload.count(b"{")
             + payload.count(b'"') // 2 + 1)
    if quick <= MAX_JSON_TOKENS:
        return quick  # even counting what lies inside strings it is small
    bare = payload.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURAL)
    strings = bare.count(b'"') // 2
    if strings > MAX_JSON_TOKENS:
        return strings
    outside = bare.split(b'"')[::2]  # at most 2 * MAX_JSON_TOKENS + 1 pieces
    return strings + 1 + sum(p.count(b",") + p.count(b"[") + p.count(b"{") for p in outside)


def parse_guest_message(payload: bytes) -> GuestMessage:
    """Validate one frame payload from the guest into its typed model.

    Bounded: a payload with more than :data:`MAX_JSON_TOKENS` structural tokens is refused before
    it is parsed (a JSON parser's memory grows with the number of values, not the bytes).
    """
    tokens = json_token_count(payload)
    if tokens > MAX_JSON_TOKENS:
        raise FrameError(
            f"frame with {tokens} JSON values exceeds the {MAX_JSON_TOKENS}-value cap",
            context={"tokens": tokens, "max_tokens": MAX_JSON_TOKENS,
                     "payload_head": payload[:200].decode("utf-8", "replace")},
        )
    try:
        return _GUEST_ADAPTER.validate_json(payload)
    except ValidationError as exc:
        # include_input=False: the offending input may be a huge list - never turn it into objects.
        errors = exc.errors(include_url=False, include_input=False, include_context=False)[:5]
        first = errors[0].get("msg", "invalid") if errors else "invalid"
        raise FrameError(
            f"invalid message from the guest agent: {first}",
            context={"errors": errors, "payload_head": payload[:200].decode("utf-8", "replace")},
        ) from None


class FrameDecoder:
    """Incremental decoder of guest frames: feed bytes, get payloads.

    ``resync=True`` skips bytes until the next magic instead of failing: the host uses that only
    until the agent's first ``hello``, because a previous host connection may have left the tail
    of a frame in the virtio-serial port. After that any violation is fatal.
    """

    def __init__(self, *, max_frame_bytes: int = MAX_FRAME_BYTES, resync: bool = False) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.resync = resync
        self._buf = bytearray()
        self.skipped_bytes = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            problem = self._header_problem()
            if problem is None:
                if len(self._buf) < HEADER_LEN:
                    return out
                n = int.from_bytes(self._buf[4:8], "big")
                if len(self._buf) < HEADER_LEN + n:
                    return out
                out.append(bytes(self._buf[HEADER_LEN:HEADER_LEN + n]))
                del self._buf[:HEADER_LEN + n]
                continue
            if not self.resync:
                raise FrameError(problem, context={"head": bytes(self._buf[:16]).hex()})
            idx = self._buf.find(MAGIC, 1)
            drop = idx if idx > 0 else max(1, len(self._buf) - (len(MAGIC) - 1))
            del self._buf[:drop]
            self.skipped_bytes += drop

    def _header_problem(self) -> str | None:
        head = bytes(self._buf[:HEADER_LEN])
        if not MAGIC.startswith(head[:3]):
            return f"bad frame magic {head[:3]!r}"
        if len(head) >= 4 and head[3] != PROTOCOL_VERSION:
            return f"unsupported protocol version {head[3]} (expected {PROTOCOL_VERSION})"
        if len(head) >= HEADER_LEN:
            n = int.from_bytes(head[4:8], "big")
            if n > self.max_frame_bytes:
                return f"frame of {n} bytes exceeds the {self.max_frame_bytes}-byte cap"
        return None
