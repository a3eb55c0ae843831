"""The one place package tools (pip, npm, mkfs.ext4) run: a subprocess with the caller's
environment, output capped, killed and reaped on timeout or cancellation; and the retry of
host network failures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from exec_sandbox.errors import PackageFetchError, SandboxPermanentError
from smartvm.cleanup import shielded

__all__ = ["ToolOutput", "retry_fetch", "run_package_tool"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_OUTPUT_CAP = 1 << 20  # what is kept of each stream: pip's and npm's messages, never megabytes
_DEFAULT_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ToolOutput:
    returncode: int
    stdout: str
    stderr: str


async def run_package_tool(
    argv: Sequence[str],
    *,
    cwd: Path,
    what: str,
    env: Mapping[str, str] | None = None,
    timeout: float = _DEFAULT_TIMEOUT_S,
) -> ToolOutput:
    """Run ``argv`` in ``cwd`` (environment: ours plus ``env``); its exit code and output tails."""
    full_env = {**os.environ, **(env or {})}
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=full_env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, umask=0o022,
        )
    except OSError as exc:
        raise SandboxPermanentError(
            f"cannot run {what} ({argv[0]}): {exc}", context={"field": "packages", "command": argv[0]}
        ) from exc
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError as exc:
        raise PackageFetchError(f"{what} did not finish within {timeout:g}s", stderr="") from exc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await shielded(proc.wait())
    assert proc.returncode is not None
    return ToolOutput(
        proc.returncode,
        out[-_OUTPUT_CAP:].decode(errors="replace"),
        err[-_OUTPUT_CAP:].decode(errors="replace"),
    )


async def retry_fetch(step: Callable[[], Awaitable[T]], *, attempts: int = 3, delay_s: float = 1.0) -> T:
    """Run ``step``; a :class:`PackageFetchError` (host network failure) is retried ``attempts`` times
    in all, waiting ``delay_s``, doubling. Anything else propagates at once."""
    for attempt in range(1, attempts + 1):
        try:
            return await step()
        except PackageFetchError as exc:
            if attempt >= attempts:
                raise
            logger.warning("package download failed (%s); retry %d of %d", exc.message, attempt, attempts - 1)
            await asyncio.sleep(delay_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover
