"""The one place image builds run host commands: errors carry the step, command and stderr tail."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from exec_sandbox.errors import ImageBuildError

__all__ = ["run", "run_streaming"]

_TAIL = 4000


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("LC_ALL", "C")
    env["DEBIAN_FRONTEND"] = "noninteractive"
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str | Path],
    *,
    step: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion; a non-zero exit raises :class:`ImageBuildError` naming ``step``."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=_env(env),
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
            input=input_text,
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{step}: command not found: {args[0]}", step=step, context={"command": args}
        ) from exc
    if check and proc.returncode != 0:
        raise ImageBuildError(
            f"{step}: `{' '.join(args[:6])}` exited with {proc.returncode}: {proc.stderr.strip()[-400:]}",
            step=step,
            stderr=proc.stderr[-_TAIL:],
            context={"command": args, "exit_code": proc.returncode},
        )
    return proc


def run_streaming(
    argv: Sequence[str | Path],
    *,
    step: str,
    on_line: Callable[[int, str], None],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a long command, calling ``on_line(count, line)`` per output line (stdout+stderr merged)."""
    args = [str(a) for a in argv]
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{step}: command not found: {args[0]}", step=step, context={"command": args}
        ) from exc
    try:
        assert proc.stdout is not None
        for count, line in enumerate(proc.stdout, 1):
            tail.append(line)
            if len(tail) > 60:
                del tail[:20]
            on_line(count, line.rstrip("\n"))
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if code != 0:
        text = "".join(tail)
        raise ImageBuildError(
            f"{step}: `{' '.join(args[:6])}` exited with {code}: {text.strip()[-400:]}",
            step=step,
            stderr=text[-_TAIL:],
            context={"command": args, "exit_code": code},
        )
