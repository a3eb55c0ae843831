"""Input validation at the public API boundary (pure functions, no I/O).

Each ``validate_*`` returns the value in its canonical form or raises
:class:`~exec_sandbox.errors.SandboxInputError` whose ``context`` holds ``field`` (which argument was
wrong), ``value`` (the offending value, ``repr``-truncated to :data:`MAX_CONTEXT_VALUE_CHARS`) and,
where it helps, the limit that was broken. Nothing here trusts the guest agent to refuse bad input:
the host rejects it before a VM is spent on it.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from exec_sandbox.errors import SandboxInputError
from exec_sandbox.models import LANGUAGES, Language, PortForward
from exec_sandbox.protocol.agent import MAX_CODE_BYTES, MAX_ENV_VARS

__all__ = [
    "DEFAULT_WORKDIR",
    "MAX_CONTEXT_VALUE_CHARS",
    "MAX_DOMAINS",
    "MAX_ENV_ENTRY_BYTES",
    "MAX_ENV_NAME_CHARS",
    "MAX_ENV_TOTAL_BYTES",
    "MAX_ENV_VARS",
    "MAX_GUEST_PATH_BYTES",
    "MAX_PATH_COMPONENT_BYTES",
    "MAX_PORT_FORWARDS",
    "MAX_VCPUS",
    "MIN_MEMORY_MB",
    "RESERVED_ENV_NAMES",
    "RESERVED_ENV_PREFIXES",
    "input_error",
    "validate_code",
    "validate_domain",
    "validate_domains",
    "validate_downloads",
    "validate_env_vars",
    "validate_guest_path",
    "validate_language",
    "validate_memory_mb",
    "validate_port_forwards",
    "validate_timeout",
    "validate_uploads",
    "validate_vcpus",
]

MAX_CONTEXT_VALUE_CHARS: Final = 200
DEFAULT_WORKDIR: Final = "/home/sandbox"

# Linux caps one "NAME=value" string passed to execve at MAX_ARG_STRLEN (32 pages = 128 KiB) including
# its NUL; larger entries make the guest's exec fail with E2BIG, so refuse them here instead.
MAX_ENV_ENTRY_BYTES: Final = 128 * 1024 - 1
MAX_ENV_TOTAL_BYTES: Final = 512 * 1024
MAX_ENV_NAME_CHARS: Final = 255
# Names the guest agent sets for itself. Overriding them breaks the sandbox's own plumbing (SBX_* are
# the session REPL's pipe fds; unbuffered Python keeps streamed output in order; PS1/PS2/PS4 would
# inject prompts into a shell session's stdout), so they are refused rather than silently ignored.
RESERVED_ENV_NAMES: Final = frozenset({"PYTHONUNBUFFERED", "PS1", "PS2", "PS4"})
RESERVED_ENV_PREFIXES: Final = ("SBX_",)

MAX_GUEST_PATH_BYTES: Final = 4096
MAX_PATH_COMPONENT_BYTES: Final = 255
MIN_MEMORY_MB: Final = 64
MAX_VCPUS: Final = 64
MAX_PORT_FORWARDS: Final = 64
MAX_DOMAINS: Final = 1024

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > MAX_CONTEXT_VALUE_CHARS:
        text = text[: MAX_CONTEXT_VALUE_CHARS - 3] + "..."
    return text


def input_error(field: str, value: object, message: str, **extra: Any) -> SandboxInputError:
    """A :class:`SandboxInputError` naming ``field`` and a truncated ``repr`` of ``value``."""
    return SandboxInputError(f"{field}: {message}", context={"field": field, "value": _show(value), **extra})


def validate_language(language: object, *, field: str = "language") -> Language:
    """One of ``python``, ``javascript``, ``raw``."""
    for known in LANGUAGES:
        if language == known:
            return known
    raise input_error(field, language, f"unknown language; expected one of {', '.join(LANGUAGES)}")


def validate_code(code: object, *, max_bytes: int = MAX_CODE_BYTES, field: str = "code") -> str:
    """A ``str`` without NUL whose UTF-8 encoding is at most ``max_bytes`` bytes."""
    if not isinstance(code, str):
        raise input_error(field, code, f"must be a str, not {type(code).__name__}")
    if "\x00" in code:
        raise input_error(field, code, "must not contain NUL characters", position=code.index("\x00"))
    try:
        size = len(code.encode("utf-8"))
    except UnicodeEncodeError as exc:
        # Lone surrogates cannot be sent to the guest as UTF-8.
        raise input_error(
            field, code, f"is not valid Unicode text ({exc.reason})", position=exc.start
        ) from None
    if size > max_bytes:
        raise input_error(
            field,
            code,
            f"is {size} bytes of UTF-8, more than the limit of {max_bytes}",
            size_bytes=size,
            limit_bytes=max_bytes,
        )
    return code


def _utf8_len(field: str, text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise input_error(field, text, f"is not valid Unicode text ({exc.reason})") from None


def validate_env_vars(
    env_vars: Mapping[str, str] | None,
    *,
    field: str = "env_vars",
    max_vars: int = MAX_ENV_VARS,
    max_entry_bytes: int = MAX_ENV_ENTRY_BYTES,
    max_total_bytes: int = MAX_ENV_TOTAL_BYTES,
) -> dict[str, str]:
    """Environment variables for user code: valid names, not reserved, no NUL, size-capped.

    An entry's size is that of ``NAME=value`` in UTF-8; the total is the sum over all entries.
    """
    if env_vars is None:
        return {}
    if not isinstance(env_vars, Mapping):
        raise input_error(
            field, env_vars, f"must be a mapping of names to strings, not {type(env_vars).__name__}"
        )
    if len(env_vars) > max_vars:
        raise input_error(
            field,
            f"<{len(env_vars)} variables>",
            f"has {len(env_vars)} variables, more than the limit of {max_vars}",
            count=len(env_vars),
            limit=max_vars,
        )
    result: dict[str, str] = {}
    total = 0
    for name, value in env_vars.items():
        key = f"{field}[{_show(name)}]"
        if not isinstance(name, str):
            raise input_error(field, name, f"variable names must be str, not {type(name).__name__}")
        if len(name) > MAX_ENV_NAME_CHARS:
            raise input_error(field, name, f"variable name is longer than {MAX_ENV_NAME_CHARS} characters")
        if not _ENV_NAME.fullmatch(name):
            raise input_error(field, name, "invalid variable name; names match [A-Za-z_][A-Za-z0-9_]*")
        if name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES):
            raise input_error(
                field,
                name,
                f"{name} is reserved by the sandbox and cannot be set",
                reserved=sorted(RESERVED_ENV_NAMES),
                reserved_prefixes=list(RESERVED_ENV_PREFIXES),
            )
        if not isinstance(value, str):
            raise input_error(key, value, f"value must be a str, not {type(value).__name__}")
        if "\x00" in value:
            raise input_error(key, value, "value must not contain NUL characters")
        entry = len(name) + 1 + _utf8_len(key, value)
        if entry > max_entry_bytes:
            raise input_error(
                key,
                value,
                f"NAME=value is {entry} bytes, more than the limit of {max_entry_bytes}",
                size_bytes=entry,
                limit_bytes=max_entry_bytes,
            )
        total += entry
        if total > max_total_bytes:
            raise input_error(
                field,
                f"<{len(env_vars)} variables>",
                f"the variables add up to more than {max_total_bytes} bytes",
                limit_bytes=max_total_bytes,
            )
        result[name] = value
    return result


def _number(field: str, value: object) -> float:
    # bool is an int subclass; True seconds / True megabytes is always a caller bug.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise input_error(field, value, f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise input_error(field, value, "must be a finite number")
    return float(value)


def validate_timeout(
    timeout_seconds: object, *, max_seconds: float = 3600.0, field: str = "timeout_seconds"
) -> float:
    """A finite number of seconds in ``(0, max_seconds]``."""
    seconds = _number(field, timeout_seconds)
    if seconds <= 0:
        raise input_error(field, timeout_seconds, "must be greater than 0")
    if seconds > max_seconds:
        raise input_error(
            field, timeout_seconds, f"must be at most {max_seconds:g} seconds", limit=max_seconds
        )
    return seconds


def validate_memory_mb(
    memory_mb: object, *, min_mb: int = MIN_MEMORY_MB, max_mb: int = 16384, field: str = "memory_mb"
) -> int:
    """A whole number of MiB in ``[min_mb, max_mb]``."""
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int):
        raise input_error(field, memory_mb, f"must be an int (MiB), not {type(memory_mb).__name__}")
    if not min_mb <= memory_mb <= max_mb:
        raise input_error(
            field, memory_mb, f"must be between {min_mb} and {max_mb} MiB", min=min_mb, max=max_mb
        )
    return memory_mb


def validate_vcpus(vcpus: object, *, max_vcpus: int = MAX_VCPUS, field: str = "vcpus") -> int:
    """A whole number of virtual CPUs in ``[1, max_vcpus]``."""
    if isinstance(vcpus, bool) or not isinstance(vcpus, int):
        raise input_error(field, vcpus, f"must be an int, not {type(vcpus).__name__}")
    if not 1 <= vcpus <= max_vcpus:
        raise input_error(field, vcpus, f"must be between 1 and {max_vcpus}", min=1, max=max_vcpus)
    return vcpus


def validate_guest_path(
    path: object, *, workdir: str = DEFAULT_WORKDIR, allow_workdir: bool = False, field: str = "path"
) -> str:
    """A path inside the guest's work dir, returned relative to it and normalised (``"."`` = the work dir).

    Relative paths are taken from the work dir; absolute ones must lie under ``workdir``. ``a/../b`` is
    fine (it is ``b``); anything that normalises to outside the work dir is refused. Normalisation is
    lexical, which matches the guest agent: it resolves paths without following symlinks.
    """
    if not isinstance(path, str):
        raise input_error(field, path, f"must be a str, not {type(path).__name__}")
    if not path:
        raise input_error(field, path, "must not be empty")
    if "\x00" in path:
        raise input_error(field, path, "must not contain NUL characters")
    size = _utf8_len(field, path)
    if size > MAX_GUEST_PATH_BYTES:
        raise input_error(
            field,
            path,
            f"is {size} bytes long, more than the limit of {MAX_GUEST_PATH_BYTES}",
            limit_bytes=MAX_GUEST_PATH_BYTES,
        )
    root = posixpath.normpath(workdir)
    if path.startswith("/"):
        full = posixpath.normpath(path)
        # normpath keeps a leading "//"; POSIX leaves its meaning open, so refuse it outright.
        if full.startswith("//") or not (full == root or full.startswith(root + "/")):
            raise input_error(field, path, f"is outside the sandbox work dir {root}", workdir=root)
        rel = posixpath.relpath(full, root)
    else:
        rel = posixpath.normpath(path)
        if rel == ".." or rel.startswith("../"):
            raise input_error(field, path, f"escapes the sandbox work dir {root}", workdir=root)
    for part in rel.split("/"):
        if len(part.encode("utf-8")) > MAX_PATH_COMPONENT_BYTES:
            raise input_error(
                field,
                path,
                f"has a component longer than {MAX_PATH_COMPONENT_BYTES} bytes",
                limit_bytes=MAX_PATH_COMPONENT_BYTES,
            )
    if rel == "." and not allow_workdir:
        raise input_error(field, path, "names the work dir itself, not a file in it")
    return rel


def _port_forward(field: str, item: object) -> PortForward:
    if isinstance(item, PortForward):
        return item
    if isinstance(item, bool):
        raise input_error(field, item, "must be a port, 'HOST:GUEST' or a PortForward")
    if isinstance(item, int):
        return _port_forward(field, {"guest_port": item})
    if isinstance(item, str):
        # CLI form, like docker's -p: "GUEST", "HOST:GUEST" or "ADDR:HOST:GUEST", optional "/udp".
        spec, _, proto = item.partition("/")
        pieces = spec.rsplit(":", 2)
        try:
            numbers = [int(p) for p in pieces[-2:]] if len(pieces) > 1 else [int(pieces[0])]
        except ValueError:
            raise input_error(
                field,
                item,
                "expected GUEST, HOST:GUEST or ADDR:HOST:GUEST (optionally /tcp or /udp) with numeric ports",
            ) from None
        data: dict[str, object] = {"guest_port": numbers[-1], "protocol": proto or "tcp"}
        if len(numbers) == 2:
            data["host_port"] = numbers[0]
        if len(pieces) == 3:
            data["host_addr"] = pieces[0].strip("[]")
        return _port_forward(field, data)
    if isinstance(item, Mapping):
        from pydantic import ValidationError

        try:
            return PortForward.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "port forward"
            raise input_error(field, item, f"{where}: {first['msg']}") from None
    raise input_error(
        field, item, f"must be a port, 'HOST:GUEST' or a PortForward, not {type(item).__name__}"
    )


def validate_port_forwards(
    port_forwards: Iterable[PortForward | Mapping[str, object] | int | str] | None,
    *,
    field: str = "port_forwards",
) -> tuple[PortForward, ...]:
    """Normalise port forwards; refuse two that would bind the same host address, port and protocol."""
    if port_forwards is None:
        return ()
    if isinstance(port_forwards, (str, bytes, Mapping)) or not isinstance(port_forwards, Iterable):
        raise input_error(field, port_forwards, "must be a list of port forwards")
    result = tuple(_port_forward(field, item) for item in port_forwards)
    if len(result) > MAX_PORT_FORWARDS:
        raise input_error(
            field,
            f"<{len(result)} forwards>",
            f"at most {MAX_PORT_FORWARDS} port forwards",
            limit=MAX_PORT_FORWARDS,
        )
    seen: set[tuple[str, str, int]] = set()
    for fwd in result:
        key = (fwd.protocol, fwd.host_addr, fwd.host_port)
        if fwd.host_port and key in seen:
            raise input_error(
                field,
                fwd.model_dump(),
                f"host {fwd.protocol} port {fwd.host_addr}:{fwd.host_port} is forwarded twice",
            )
        seen.add(key)
    return result


def validate_domain(domain: object, *, field: str = "allowed_domains") -> str:
    """A hostname (``example.com``) or a leading wildcard (``*.example.com``), lower-cased, IDNA-encoded.

    IP addresses are not domains and are refused (an all-numeric last label is not a hostname).
    """
    if not isinstance(domain, str):
        raise input_error(field, domain, f"entries must be str, not {type(domain).__name__}")
    name = domain.strip().lower().removesuffix(".")
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    if not name:
        raise input_error(field, domain, "must not be empty")
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise input_error(field, domain, "is not a valid hostname") from None
    labels = ascii_name.split(".")
    if "*" in ascii_name:
        raise input_error(
            field, domain, "a wildcard is only allowed as the whole first label ('*.example.com')"
        )
    if len(ascii_name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise input_error(
            field,
            domain,
            "is not a valid hostname (labels of 1-63 letters, digits or '-', "
            "not starting or ending with '-'; at most 253 characters)",
        )
    if labels[-1].isdigit():
        raise input_error(field, domain, "IP addresses are not allowed; list domain names")
    if wildcard and len(labels) < 2:
        raise input_error(
            field,
            domain,
            "a wildcard must cover a domain with at least two labels ('*.example.com', not '*.com')",
        )
    return f"*.{ascii_name}" if wildcard else ascii_name


def validate_domains(domains: Iterable[str] | None, *, field: str = "allowed_domains") -> tuple[str, ...]:
    """Validate and normalise every entry; duplicates are dropped, first occurrence order kept."""
    if domains is None:
        return ()
    if isinstance(domains, (str, bytes)) or not isinstance(domains, Iterable):
        raise input_error(field, domains, "must be a list of domain names, not a single string")
    result = tuple(dict.fromkeys(validate_domain(d, field=field) for d in domains))
    if len(result) > MAX_DOMAINS:
        raise input_error(
            field, f"<{len(result)} domains>", f"at most {MAX_DOMAINS} domains", limit=MAX_DOMAINS
        )
    return result


def validate_uploads(
    files: Mapping[str, bytes | Path] | None, *, max_file_bytes: int
) -> dict[str, bytes | Path]:
    """``run(files=...)``: guest path -> bytes or a readable local regular file, each within the cap."""
    if files is None:
        return {}
    if not isinstance(files, Mapping):
        raise input_error("files", files, "must be a mapping of guest paths to bytes or local Paths")
    result: dict[str, bytes | Path] = {}
    for guest_path, data in files.items():
        rel = validate_guest_path(guest_path, field="files")
        if isinstance(data, bytes | bytearray | memoryview):
            size = len(data)
            data = bytes(data)
        elif isinstance(data, Path):
            try:
                size = data.stat().st_size
            except OSError as exc:
                raise input_error(f"files[{guest_path!r}]", str(data), f"cannot read: {exc}") from None
            if not data.is_file():
                raise input_error(f"files[{guest_path!r}]", str(data), "is not a regular file")
        else:
            raise input_error(
                f"files[{guest_path!r}]", data, f"must be bytes or a Path, not {type(data).__name__}"
            )
        if size > max_file_bytes:
            raise input_error(
                f"files[{guest_path!r}]",
                f"<{size} bytes>",
                f"is larger than max_file_bytes ({max_file_bytes})",
                size_bytes=size,
                limit_bytes=max_file_bytes,
            )
        result[rel] = data
    return result

def validate_downloads(download: Sequence[str] | None) -> list[tuple[str, str]]:
    """``run(download=...)``: ``(path as given, normalised guest path)`` pairs."""
    if download is None:
        return []
    if isinstance(download, str | bytes) or not isinstance(download, Sequence):
        raise input_error("download", download, "must be a list of guest paths, not a single string")
    return [(p, validate_guest_path(p, field="download")) for p in download]
