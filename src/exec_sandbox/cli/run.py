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

Layout: argument parsing is :mod:`exec_sandbox.cli.args`, exit codes and error lines
:mod:`exec_sandbox.cli.errors`; here the terminal reporter, the JSON result, then the click command
and its async body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from exec_sandbox.cli.args import (
    Download,
    Source,
    Upload,
    check_uploads,
    parse_download_spec,
    parse_env_specs,
    parse_upload_spec,
    plan_downloads,
    resolve_source,
    write_download,
)
from exec_sandbox.cli.errors import (
    ExitCode,
    error_json,
    exit_code_for_error,
    exit_code_for_result,
    format_error,
)
from exec_sandbox.config import MAX_MEMORY_MB, SchedulerConfig
from exec_sandbox.errors import (
    GuestAgentError,
    SandboxError,
    SandboxInputError,
)
from exec_sandbox.models import LANGUAGE_EXTENSIONS, ExecutionResult, Language
from exec_sandbox.packages.request import parse_packages
from exec_sandbox.validation import (
    input_error,
    validate_code,
    validate_memory_mb,
    validate_timeout,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

    from exec_sandbox.images.progress import ProgressEvent
    from exec_sandbox.sandbox.scheduler import RunResult

__all__ = ["download_records", "result_json", "run"]


# ---- the JSON result ---------------------------------------------------------------------------


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

    def package_progress(self) -> Callable[[str, str, str], None]:
        """Renders ``--package`` steps (resolving, downloading N files, installing; not cache hits)."""
        from exec_sandbox.cli.progress import RichProgress, package_event

        renderer, started = RichProgress(self.console), {}  # type: ignore[var-annotated]

        def callback(step: str, kind: str, detail: str) -> None:
            if not self.quiet and kind != "cached":
                self.stop_status()  # one live display at a time: the boot spinner yields
                renderer(package_event(step, kind, detail, started))

        return callback

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
    packages: tuple[str, ...] = ()


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
@click.option(
    "--allow-domain",
    "allow_domains",
    multiple=True,
    metavar="NAME",
    help="Give the sandbox a network that reaches only NAME (or *.NAME) through its egress proxy. "
    "Repeatable; the network is off without it.",
)
@click.option(
    "-p",
    "--package",
    "packages",
    multiple=True,
    metavar="REQ",
    help="Install a package first (pip requirement, or npm spec like lodash@4), resolved on this host "
    "with your pip/npm configuration; cached as a disk layer. Repeatable.",
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
    allow_domains: tuple[str, ...],
    packages: tuple[str, ...],
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
            click.echo(json.dumps(error_json(exc, code)))
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
            packages=packages,
        )
        check_uploads(request.uploads)
        plan_downloads(request.downloads, force=force)
        overrides: dict[str, Any] = {"allowed_domains": allow_domains} if allow_domains else {}
        config = SchedulerConfig.from_env(**overrides)
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
    parse_packages(request.source.language, list(request.packages) or None)
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
            scheduler.packages.progress = reporter.package_progress()
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
                packages=list(request.packages) or None,
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
