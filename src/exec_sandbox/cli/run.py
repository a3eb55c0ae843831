"""``sbx run``: run one program in a fresh sandbox VM and exit with the program's exit code.

The program's stdout/stderr stream live to the terminal's stdout/stderr as the guest produces them.
Unless ``-q``, ``sbx`` itself writes only to stderr: a build progress display the first time a
language image is needed, a spinner while the VM boots (on a terminal) and one summary line at the end.

Exit codes (the convention of coreutils ``timeout`` and ``docker run``)::

    0-255  the program's own exit code (128+N when it died from signal N)
    124    the program hit its timeout (-t/--timeout)
    125    the sandbox failed: image build, VM boot, guest agent, transport, capacity (nothing to do
           with the program; "transient" errors in the message are safe to retry)
    126    invalid input, nothing ran: bad option, unreadable file, unknown language, code/env/path
           refused, a download target that already exists (use --force)
    130    interrupted (Ctrl-C); 143 when terminated by SIGTERM
    137    the guest's OOM killer killed the program (raise -m/--memory)

A program can itself exit 124-137, so only ``--json`` (``timed_out``, ``oom_killed``, ``exit_code``)
tells the two apart without doubt. A ``--download`` the program did not leave behind is reported on
stderr (``download_errors`` in ``--json``) and turns a 0 exit into 125; other exits stay the program's.

Errors are one stderr line, ``sbx: error: <ErrorClass>: <message> [key context]``, also with ``-q``;
``--debug`` adds the traceback, the guest boot log and the library's DEBUG log. With ``--json``,
stdout is exactly one JSON object: the result (:func:`result_json`) or ``{"error": {...}}``.

File arguments: a guest path never contains ``:`` (so ``--upload`` splits at the last ``:``, and
``--download`` at the first); relative guest paths are relative to the sandbox work dir.
Everything the CLI can check (language, code size, env, limits, paths, local files, download
targets) is checked before a VM or the storage daemon is started.

Layout: pure helpers (parsing, exit codes, error lines, JSON; unit-tested), the terminal reporter,
then the click command and its async body.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import os
import posixpath
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, NoReturn, TextIO

import click

from exec_sandbox.config import MAX_MEMORY_MB, SchedulerConfig
from exec_sandbox.errors import (
    CommunicationOutcomeUnknownError,
    GuestAgentError,
    SandboxError,
    SandboxInputError,
    SandboxTransientError,
)
from exec_sandbox.models import LANGUAGE_EXTENSIONS, LANGUAGES, ExecutionResult, Language, language_from_path
from exec_sandbox.validation import (
    input_error,
    validate_code,
    validate_env_vars,
    validate_guest_path,
    validate_memory_mb,
    validate_timeout,
)
from smartvm.errors import ErrorCode
from smartvm.hostfs import UnsafePathError, atomic_write_file

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

    from exec_sandbox.images.progress import ProgressEvent
    from exec_sandbox.sandbox.scheduler import RunResult

__all__ = [
    "Download",
    "ExitCode",
    "Source",
    "Upload",
    "check_uploads",
    "download_records",
    "exit_code_for_error",
    "exit_code_for_result",
    "format_error",
    "parse_download_spec",
    "parse_env_specs",
    "parse_upload_spec",
    "plan_downloads",
    "resolve_source",
    "result_json",
    "run",
    "write_download",
]


class ExitCode(enum.IntEnum):
    """``sbx run``'s own exit codes (everything else is the program's)."""

    TIMEOUT = 124
    SANDBOX_ERROR = 125
    INVALID_INPUT = 126
    INTERRUPTED = 130
    OOM_KILLED = 137
    TERMINATED = 143


# A positional that looks like a source file name but does not exist is a typo, not code to run.
_FILE_NAME: Final = re.compile(
    r"[\w.~/-]*\.(?:" + "|".join(re.escape(e[1:]) for e in LANGUAGE_EXTENSIONS) + r")", re.IGNORECASE
)
# Downloaded files hold what untrusted guest code produced: private to the user, like every file we write.
DOWNLOAD_FILE_MODE: Final = 0o600
_CONTEXT_SKIP: Final = frozenset({"errors"})
_CONTEXT_MAX_ITEMS: Final = 4
_CONTEXT_MAX_CHARS: Final = 80


# ---- pure parsing ------------------------------------------------------------------------------


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


def exit_code_for_result(result: ExecutionResult) -> int:
    """The process exit code that reports ``result`` (see the module docstring)."""
    if result.timed_out:
        return ExitCode.TIMEOUT
    if result.oom_killed:
        return ExitCode.OOM_KILLED
    if 0 <= result.exit_code <= 255:
        return result.exit_code
    return ExitCode.SANDBOX_ERROR  # not a code a process can have: the sandbox reported nonsense


def exit_code_for_error(exc: BaseException) -> int:
    if isinstance(exc, SandboxInputError):
        return ExitCode.INVALID_INPUT
    return ExitCode.SANDBOX_ERROR


def _short(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= _CONTEXT_MAX_CHARS else text[: _CONTEXT_MAX_CHARS - 1] + "…"


def format_error(exc: BaseException) -> str:
    """One line: ``ErrorClass: message [key=value ...]`` with the most telling context."""
    message = " ".join(str(exc).split()) or "(no message)"
    extras: list[str] = []
    if isinstance(exc, SandboxError):
        for key, value in exc.context.items():
            if key in _CONTEXT_SKIP or value is None or isinstance(value, dict | list | tuple):
                continue
            if isinstance(value, str | int | float) and str(value).strip("'\"") in message:
                continue  # already said
            if len(extras) == _CONTEXT_MAX_ITEMS:
                break
            extras.append(f"{key}={_short(value)}")
        for attr in ("step", "error_class"):
            value = getattr(exc, attr, None)
            if value:
                extras.append(f"{attr}={_short(value)}")
        stderr = getattr(exc, "stderr", None)
        if isinstance(stderr, str) and stderr.strip():
            extras.append(f"stderr: {_short(stderr.strip().splitlines()[-1])}")
        if isinstance(exc, SandboxTransientError):
            extras.append("transient: safe to retry")
        elif isinstance(exc, CommunicationOutcomeUnknownError):
            extras.append("the program may have run")
    tail = f" [{', '.join(extras)}]" if extras else ""
    return f"{type(exc).__name__}: {message}{tail}"


def _error_json(exc: BaseException, code: int) -> dict[str, Any]:
    context = exc.context if isinstance(exc, SandboxError) else {}
    return {
        "error": {
            "type": type(exc).__name__,
            "message": str(exc),
            "context": json.loads(json.dumps(context, default=str)),
            "retryable": isinstance(exc, SandboxTransientError),
        },
        "sbx_exit_code": code,
    }


def download_records(downloads: Sequence[Download], files: Mapping[str, bytes]) -> list[dict[str, Any]]:
    return [
        {
            "guest_path": d.guest,
            "local_path": str(d.local),
            "size_bytes": len(files[d.guest]),
            "sha256": hashlib.sha256(files[d.guest]).hexdigest(),
        }
        for d in downloads
    ]


def result_json(result: ExecutionResult, downloads: list[dict[str, Any]], code: int) -> dict[str, Any]:
    """The ``--json`` document: the result's fields (file contents left out: they were written to
    disk), ``downloads`` (what was written where, size, sha256) and ``sbx_exit_code``.

    ``download_errors`` (from :class:`~exec_sandbox.sandbox.scheduler.RunResult`; ``sbx run`` widens it to
    every requested file that was not saved) maps guest paths to the reason.
    """
    data = result.model_dump(mode="json", exclude={"files"})
    data["downloads"] = downloads
    data["sbx_exit_code"] = code
    return data


# ---- terminal output ---------------------------------------------------------------------------


class _Stream:
    """Writes program output to a host stream as it arrives; a closed pipe stops writing, not the run."""

    def __init__(self, target: TextIO, before_write: Callable[[], None]) -> None:
        self._target = target
        self._before_write = before_write
        self.broken = False
        self.last_char = "\n"

    def __call__(self, chunk: str) -> None:
        if not chunk or self.broken:
            return
        self._before_write()
        try:
            self._target.write(chunk)
            self._target.flush()
        except BrokenPipeError:
            self.broken = True
            return
        self.last_char = chunk[-1]


class _Reporter:
    """Everything ``sbx`` itself says on stderr: build progress, boot spinner, the final summary."""

    def __init__(self, *, quiet: bool, debug: bool) -> None:
        self.quiet = quiet
        self.debug = debug
        self._console: Console | None = None
        self._status: Status | None = None
        self._building = False
        self._close_renderer: Callable[[], None] | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)
        return self._console

    def build_progress(self, language: str) -> Callable[[ProgressEvent], None]:
        """A progress callback that renders image builds and keeps quiet about cache hits."""
        from exec_sandbox.cli.progress import RichProgress
        from exec_sandbox.images.progress import ProgressKind

        renderer = RichProgress(self.console)

        def callback(event: ProgressEvent) -> None:
            if self.quiet or event.kind is ProgressKind.CACHED:
                return
            if not self._building:
                self._building = True
                self.console.print(
                    f"sbx: preparing the {language} guest image (building it takes minutes, once)",
                    markup=False,
                )
            renderer(event)

        self._close_renderer = renderer.close
        return callback

    def close_build(self) -> None:
        if self._close_renderer is not None:
            self._close_renderer()

    def booting(self, language: str) -> None:
        if self.quiet or not self.console.is_terminal:
            return
        self._status = self.console.status(f"starting a {language} sandbox VM…")
        self._status.start()

    def boot_log(self, line: str) -> None:
        """--debug only: guest console lines (kernel noise like "PCI: Fatal" would alarm otherwise)."""
        self.stop_status()
        self.console.print(f"[boot] {line.rstrip()}", style="dim", markup=False)

    def stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def line(self, text: str, *, style: str | None = None) -> None:
        if not self.quiet:
            self.stop_status()
            self.console.print(text, style=style, markup=False, soft_wrap=True)

    def error(self, exc: BaseException) -> None:
        """Errors are shown even with -q: a silent non-zero exit helps nobody."""
        self.stop_status()
        if self.debug:
            traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.write(f"sbx: error: {format_error(exc)}\n")
        sys.stderr.flush()


def _summary(result: ExecutionResult, code: int, *, memory_mb: int | None, timeout: float) -> str:
    t = result.timing
    start = (
        f"restore {t.restore_ms / 1000:.2f}s" if t.restore_ms is not None else f"boot {t.boot_ms / 1000:.2f}s"
    )
    parts = [
        f"exit {code}",
        result.language,
        f"{t.total_ms / 1000:.2f}s ({start}, run {result.execution_time_ms / 1000:.2f}s)",
    ]
    if result.accelerator:
        parts.append(result.accelerator)
    if result.warm_pool_hit:
        parts.append("warm pool")
    text = "sbx: " + " · ".join(parts)
    if result.timed_out:
        text += f" · timed out after {timeout:g}s"
    if result.oom_killed:
        text += f" · killed by the guest OOM killer ({memory_mb or 'default'} MB; raise -m)"
    if result.stdout_truncated or result.stderr_truncated:
        text += " · output truncated"
    return text


# ---- the command -------------------------------------------------------------------------------


class _InvalidUsage(click.UsageError):
    exit_code = ExitCode.INVALID_INPUT


class _RunCommand(click.Command):
    """Usage errors (unknown option, bad number) exit with 126 like every other invalid input."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except _InvalidUsage:
            raise
        except click.UsageError as exc:
            raise _InvalidUsage(exc.format_message(), exc.ctx) from None


@dataclass(frozen=True)
class _Request:
    source: Source
    timeout: float | None
    memory: int | None
    env: dict[str, str]
    uploads: tuple[Upload, ...]
    downloads: tuple[Download, ...]
    as_json: bool
    force: bool


_EPILOG = """\b
Exit codes: the program's own (0-255); 124 timeout; 125 sandbox failure (image build, VM boot,
agent, transport, capacity); 126 invalid input (nothing ran); 130 interrupted; 137 killed by the
guest OOM killer; 143 terminated. --json shows timed_out/oom_killed/exit_code without ambiguity.

\b
Examples:
  sbx run 'print(1)'
  sbx run script.js
  echo 'echo $X' | sbx run -l raw -e X=1 -
  sbx run -t 5 -m 512 --upload data.csv:in.csv --download out.png job.py
"""


@click.command("run", cls=_RunCommand, epilog=_EPILOG)
@click.argument("source", metavar="CODE|FILE|-")
@click.option(
    "-l",
    "--language",
    metavar="LANG",
    help="python, javascript or raw (shell); default: from the file extension "
    f"({', '.join(sorted(LANGUAGE_EXTENSIONS))}), else python.",
)
@click.option("-t", "--timeout", type=float, metavar="SECONDS", help="Kill the program after this long.")
@click.option("-m", "--memory", type=int, metavar="MB", help="Guest memory in MiB.")
@click.option(
    "-e",
    "--env",
    "env_specs",
    multiple=True,
    metavar="K=V|K",
    help="Set an environment variable (K alone copies it from the host). Repeatable.",
)
@click.option(
    "--upload",
    "upload_specs",
    multiple=True,
    metavar="LOCAL[:GUEST]",
    help="Copy a local file into the sandbox before the program runs. Repeatable.",
)
@click.option(
    "--download",
    "download_specs",
    multiple=True,
    metavar="GUEST[:LOCAL]",
    help="Copy a file out of the sandbox afterwards (LOCAL default: its name in the current dir). "
    "Repeatable.",
)
@click.option("--force", is_flag=True, help="Let --download overwrite existing local files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the result) instead of output.")
@click.option("-q", "--quiet", is_flag=True, help="Only the program's output: no progress or summary.")
@click.option("--debug", is_flag=True, help="Show the guest boot log and tracebacks.")
def run(
    source: str,
    language: str | None,
    timeout: float | None,
    memory: int | None,
    env_specs: tuple[str, ...],
    upload_specs: tuple[str, ...],
    download_specs: tuple[str, ...],
    force: bool,
    as_json: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Run CODE, FILE or stdin (-) in a fresh sandbox VM; exit with the program's exit code.

    The program's stdout and stderr stream to this terminal as they are produced. Nothing the
    program does survives it: every run gets a new VM on a new disk overlay.
    """
    reporter = _Reporter(quiet=quiet or as_json, debug=debug)
    _configure_logging(reporter)

    def fail(exc: BaseException) -> NoReturn:
        code = exit_code_for_error(exc)
        if as_json:
            click.echo(json.dumps(_error_json(exc, code)))
        reporter.error(exc)
        sys.exit(code)

    try:
        stdin = sys.stdin.buffer if source == "-" else None
        cwd = Path.cwd()
        request = _Request(
            source=resolve_source(source, language, stdin),
            timeout=timeout,
            memory=memory,
            env=parse_env_specs(env_specs, os.environ),
            uploads=tuple(parse_upload_spec(s) for s in upload_specs),
            downloads=tuple(parse_download_spec(s, cwd) for s in download_specs),
            as_json=as_json,
            force=force,
        )
        check_uploads(request.uploads)
        plan_downloads(request.downloads, force=force)
        config = SchedulerConfig.from_env()
        _prevalidate(config, request)  # before an image lookup or a storage daemon is spent on it
        _ensure_image(config, request.source.language, reporter)
    except SandboxError as exc:
        fail(exc)
    except KeyboardInterrupt:
        reporter.line("sbx: interrupted")
        sys.exit(ExitCode.INTERRUPTED)

    try:
        code = asyncio.run(_run(config, request, reporter))
    except KeyboardInterrupt:
        reporter.line("sbx: interrupted; the sandbox VM was stopped")
        sys.exit(ExitCode.INTERRUPTED)
    except SandboxError as exc:
        fail(exc)
    except (OSError, RuntimeError, ValueError) as exc:
        # A host-side failure outside the sandbox's error tree (a bug, a full disk): still one line.
        fail(exc)
    sys.exit(code)


class _LogLine(logging.Handler):
    """Library warnings as one ``sbx: warning: ...`` line each (no traceback), clear of the spinner."""

    def __init__(self, reporter: _Reporter) -> None:
        super().__init__(logging.WARNING)
        self._reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = " ".join(record.getMessage().split())
        except Exception:  # a bad format string in a library log call must not end the run
            message = str(record.msg)
        self._reporter.stop_status()
        sys.stderr.write(f"sbx: {record.levelname.lower()}: {message}\n")
        sys.stderr.flush()


def _configure_logging(reporter: _Reporter) -> None:
    """--debug: the library's full DEBUG log. -q/--json: nothing. Else: warnings, one line each."""
    if reporter.debug:
        logging.basicConfig(
            stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
        )
    for name in ("exec_sandbox", "smartvm"):
        logger = logging.getLogger(name)
        if reporter.debug:
            logger.setLevel(logging.DEBUG)
        elif reporter.quiet:
            logger.setLevel(logging.CRITICAL + 1)  # errors that matter reach the user as the error line
        else:
            logger.addHandler(_LogLine(reporter))
            logger.propagate = False


def _prevalidate(config: SchedulerConfig, request: _Request) -> None:
    """The checks ``Scheduler.run`` makes too, but with the CLI's option names and nothing started."""
    validate_code(request.source.code, max_bytes=config.max_code_bytes, field=request.source.origin)
    if request.timeout is not None:
        validate_timeout(request.timeout, max_seconds=config.max_timeout_seconds, field="--timeout")
    if request.memory is not None:
        validate_memory_mb(request.memory, max_mb=MAX_MEMORY_MB, field="--memory")
    for upload in request.uploads:
        size = upload.local.stat().st_size
        if size > config.max_file_bytes:
            raise input_error(
                "--upload",
                str(upload.local),
                f"{upload.local} is {size} bytes, more than max_file_bytes ({config.max_file_bytes})",
                limit_bytes=config.max_file_bytes,
            )


def _ensure_image(config: SchedulerConfig, language: Language, reporter: _Reporter) -> None:
    """Build the guest image now if it is missing, rendering progress (Scheduler would build silently).

    Runs synchronously before the event loop so Ctrl-C interrupts the build at once.
    """
    from exec_sandbox.vm_manager import VmManager

    try:
        VmManager(config.settings(), progress=reporter.build_progress(language)).get_bundle(language)
    finally:
        reporter.close_build()


async def _run(config: SchedulerConfig, request: _Request, reporter: _Reporter) -> int:
    from exec_sandbox.sandbox.scheduler import Scheduler

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        if task is not None:
            task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    stdout = _Stream(sys.stdout, reporter.stop_status)
    stderr = _Stream(sys.stderr, reporter.stop_status)
    streaming = not request.as_json
    try:
        reporter.booting(request.source.language)
        async with Scheduler(config) as scheduler:
            result = await scheduler.run(
                request.source.code,
                language=request.source.language,
                timeout_seconds=request.timeout,
                memory_mb=request.memory,
                env_vars=request.env or None,
                on_stdout=stdout if streaming else None,
                on_stderr=stderr if streaming else None,
                on_boot_log=reporter.boot_log if reporter.debug else None,
                files={u.guest: u.local for u in request.uploads} or None,
                download=list(dict.fromkeys(d.guest for d in request.downloads)) or None,
            )
    except asyncio.CancelledError:
        if terminated:
            reporter.line("sbx: terminated; the sandbox VM was stopped")
            return ExitCode.TERMINATED
        raise
    finally:
        reporter.stop_status()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)

    code = exit_code_for_result(result)
    written, failed = _save_downloads(result, request)
    records = download_records(written, result.files)
    if failed:
        # The program ran and its outcome stands; a file that did not arrive is still a failure.
        detail = "; ".join(f"{guest}: {reason}" for guest, reason in failed.items())
        reporter.error(
            GuestAgentError(f"--download failed: {detail}", context={"download": ", ".join(failed)})
        )
        if code == 0:
            code = ExitCode.SANDBOX_ERROR

    if request.as_json:
        document = result_json(result, records, code)
        document["download_errors"] = failed
        click.echo(json.dumps(document))
        return code
    for record in records:
        reporter.line(
            f"sbx: downloaded {record['guest_path']} -> {record['local_path']} ({record['size_bytes']} bytes)"
        )
    if not reporter.quiet:
        if stdout.last_char != "\n" or stderr.last_char != "\n":
            reporter.line("")
        timeout = request.timeout or config.default_timeout_seconds
        reporter.line(_summary(result, code, memory_mb=request.memory, timeout=timeout), style="dim")
    return code


def _save_downloads(result: RunResult, request: _Request) -> tuple[list[Download], dict[str, str]]:
    """Write the downloaded files; return those written and, per guest path, why the others were not."""
    written: list[Download] = []
    failed: dict[str, str] = {}
    for d in request.downloads:
        if d.guest not in result.files:
            failed[d.guest] = result.download_errors.get(d.guest, "the sandbox returned no file")
            continue
        try:
            write_download(result.files[d.guest], d.local, force=request.force)
        except SandboxInputError as exc:
            failed[d.guest] = exc.message
        except OSError as exc:
            failed[d.guest] = f"cannot write {d.local}: {exc.strerror or exc}"
        else:
            written.append(d)
    return written, failed
