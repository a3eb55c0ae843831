"""``sbx run`` arguments, parsed and checked before any VM starts (pure, unit-tested): the program
source, ``-e K=V``, ``--upload LOCAL:GUEST``, ``--download GUEST[:LOCAL]`` and writing a download.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from exec_sandbox.models import LANGUAGE_EXTENSIONS, LANGUAGES, Language, language_from_path
from exec_sandbox.validation import (
    input_error,
    validate_env_vars,
    validate_guest_path,
)
from smartvm.errors import ErrorCode
from smartvm.hostfs import UnsafePathError, atomic_write_file

if TYPE_CHECKING:

    pass

__all__ = [
    "DOWNLOAD_FILE_MODE",
    "Download",
    "Source",
    "Upload",
    "check_uploads",
    "parse_download_spec",
    "parse_env_specs",
    "parse_upload_spec",
    "plan_downloads",
    "resolve_source",
    "write_download",
]

logger = logging.getLogger(__name__)


# A positional that looks like a source file name but does not exist is a typo, not code to run.
_FILE_NAME: Final = re.compile(
    r"[\w.~/-]*\.(?:" + "|".join(re.escape(e[1:]) for e in LANGUAGE_EXTENSIONS) + r")", re.IGNORECASE
)


# Downloaded files hold what untrusted guest code produced: private to the user, like every file we write.
DOWNLOAD_FILE_MODE: Final = 0o600


@dataclass(frozen=True)
class Source:
    """The program to run: its text, its language and where it came from (for messages)."""

    code: str
    language: Language
    origin: str  # "<argument>", "<stdin>" or the file path


@dataclass(frozen=True)
class Upload:
    local: Path
    guest: str


@dataclass(frozen=True)
class Download:
    guest: str
    local: Path


def resolve_source(arg: str, language: str | None, stdin: IO[bytes] | None = None) -> Source:
    """Turn the ``CODE|FILE|-`` argument into code + language.

    ``-`` reads ``stdin``; an existing file is read (its extension picks the language unless
    ``language`` is given); anything else is the code itself (Python unless ``language`` is given).
    """
    lang = _language_option(language) if language is not None else None
    if arg == "-":
        if stdin is None:
            raise input_error("CODE", arg, "'-' needs a readable stdin")
        return Source(_decode(stdin.read(), "<stdin>"), lang or "python", "<stdin>")
    path = Path(arg)
    if "\n" not in arg and len(arg) < 4096 and path.exists():
        if not path.is_file():
            raise input_error("FILE", arg, f"{arg} is not a regular file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise input_error("FILE", arg, f"cannot read {arg} ({exc.strerror})") from None
        return Source(_decode(data, arg), lang or language_from_path(path), arg)
    if lang is None and _FILE_NAME.fullmatch(arg):
        raise input_error("FILE", arg, f"no such file: {arg} (to run this text as code, pass -l/--language)")
    return Source(arg, lang or "python", "<argument>")


def _language_option(language: str) -> Language:
    for known in LANGUAGES:
        if language == known:
            return known
    aliases: dict[str, Language] = {"js": "javascript", "node": "javascript", "sh": "raw", "shell": "raw"}
    if language in aliases:
        return aliases[language]
    raise input_error(
        "--language", language, f"unknown language {language!r}; expected one of {', '.join(LANGUAGES)}"
    )


def _decode(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise input_error(
            "CODE" if origin.startswith("<") else "FILE",
            origin,
            f"is not UTF-8 text (bad byte at offset {exc.start})",
            position=exc.start,
        ) from None


def parse_env_specs(specs: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """``-e K=V`` sets K to V; ``-e K`` copies K from ``environ``. Later specs win. Names are validated."""
    env: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            if name not in environ:
                raise input_error(
                    "-e", spec, f"{name} is not set in the host environment (use -e {name}=VALUE)"
                )
            value = environ[name]
        env[name] = value
    return validate_env_vars(env, field="-e")


def parse_upload_spec(spec: str) -> Upload:
    """``LOCAL:GUEST`` (split at the last ``:``) or ``LOCAL`` (to the work dir under its own name)."""
    local_text, sep, guest = spec.rpartition(":")
    if not sep:
        local_text, guest = spec, ""
    if not local_text:
        raise input_error("--upload", spec, "expected LOCAL:GUEST (LOCAL is empty)")
    local = Path(local_text).expanduser()
    if not guest:
        guest = local.name
    guest = validate_guest_path(guest, field="--upload")  # the work dir itself is refused there
    if not local.exists():
        raise input_error("--upload", spec, f"no such local file: {local}")
    if not local.is_file():
        raise input_error("--upload", spec, f"{local} is not a regular file (directories are not supported)")
    if not os.access(local, os.R_OK):
        raise input_error("--upload", spec, f"{local} is not readable")
    return Upload(local, guest)


def check_uploads(uploads: Sequence[Upload]) -> None:
    """Two uploads to one guest path would silently drop one of them: refuse."""
    seen: dict[str, Path] = {}
    for u in uploads:
        if u.guest in seen:
            raise input_error(
                "--upload", u.guest, f"{seen[u.guest]} and {u.local} both go to {u.guest}", guest=u.guest
            )
        seen[u.guest] = u.local


def parse_download_spec(spec: str, cwd: Path) -> Download:
    """``GUEST[:LOCAL]`` (split at the first ``:``); LOCAL defaults to GUEST's name in ``cwd``.

    A LOCAL that is an existing directory (or ends in ``/``) receives the file under GUEST's name.
    """
    guest_text, sep, local_text = spec.partition(":")
    guest = validate_guest_path(guest_text, field="--download")  # never the work dir itself
    name = posixpath.basename(guest)
    if sep and not local_text:
        raise input_error("--download", spec, "LOCAL after ':' is empty")
    if not local_text:
        return Download(guest, cwd / name)
    local = Path(local_text).expanduser()
    if not local.is_absolute():
        local = cwd / local
    if local_text.endswith("/") or local.is_dir():
        local = local / name
    return Download(guest, local)


def plan_downloads(downloads: Sequence[Download], *, force: bool) -> None:
    """Refuse, before anything runs, targets that exist (unless ``force``), repeat, or lack a directory."""
    seen: dict[Path, str] = {}
    for d in downloads:
        target = d.local.absolute()
        if target in seen:
            raise input_error(
                "--download", d.guest, f"{target} is also the target of {seen[target]}", local=str(target)
            )
        seen[target] = d.guest
        if not target.parent.is_dir():
            raise input_error("--download", d.guest, f"directory {target.parent} does not exist")
        if not os.access(target.parent, os.W_OK):
            raise input_error("--download", d.guest, f"directory {target.parent} is not writable")
        if target.is_symlink():
            raise input_error(
                "--download", d.guest, f"{target} is a symbolic link; give the real path", local=str(target)
            )
        if target.is_dir():
            raise input_error("--download", d.guest, f"{target} is a directory")
        if target.exists() and not force:
            raise input_error(
                "--download", d.guest, f"{target} exists; use --force to overwrite it", local=str(target)
            )


def write_download(data: bytes, target: Path, *, force: bool) -> None:
    """Write ``data`` to ``target`` atomically; without ``force`` never replace an existing file.

    Through :func:`smartvm.hostfs.atomic_write_file`: the bytes go to a new temporary file with an
    unpredictable name beside the target (``mkstemp``: ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600),
    so a reader never sees half a file and nothing planted beside the target is written through;
    ``os.link`` (or, with ``force``, ``rename``) then publishes it. A symlink at ``target`` is
    refused, ``--force`` or not: give the real path (a rename would replace the link itself, not
    the file it names, which is never what the user meant).
    """
    try:
        atomic_write_file(target, data, overwrite=force, mode=DOWNLOAD_FILE_MODE)
    except UnsafePathError as exc:
        if exc.code == ErrorCode.PATH_EXISTS:
            raise input_error(
                "--download", str(target), f"{target} exists; use --force to overwrite it"
            ) from None
        raise input_error(
            "--download", str(target), exc.message, local=str(target), problem=exc.problem
        ) from None
