"""Fetch one artifact into place: stream, verify, then rename.

Both :func:`download_artifact` (HTTP via httpx) and :func:`copy_artifact` (a local
path) write to a hidden temp file beside the destination, hash while writing,
check the size and digests, ``fsync`` and only then ``os.replace`` onto the
destination. A failure, a mismatch or a cancellation removes the temp file, so
the destination is either absent, the previous file, or the verified new one.

Size and digest mismatches raise ``BASE_IMAGE_CHECKSUM_MISMATCH``; transport
failures raise ``BASE_IMAGE_DOWNLOAD_FAILED`` (``retryable=True``); a missing
local source raises ``BASE_IMAGE_NOT_FOUND``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

from smartvm.errors import ErrorCode, SmartVMError

__all__ = [
    "ArtifactDigest",
    "Expected",
    "ProgressFn",
    "copy_artifact",
    "download_artifact",
    "hash_file",
    "http_status_error",
    "temp_path_for",
    "verify_file",
]

CHUNK_SIZE = 1024 * 1024
# Progress is reported at most once per this many bytes (plus start and end).
PROGRESS_STEP = 1024 * 1024

ProgressFn = Callable[[str, int, int | None], None]
"""Called with ``(phase, bytes_done, bytes_total_or_None)`` on the event loop thread;
``phase`` is ``"start"`` once, ``"progress"`` at most once per MiB, ``"done"`` once."""


@dataclass(frozen=True)
class Expected:
    """What a fetched artifact must match; ``None`` means "not known, not checked"."""

    sha256: str | None = None
    size: int | None = None
    md5: str | None = None


@dataclass(frozen=True)
class ArtifactDigest:
    sha256: str
    size: int
    md5: str | None = None


def _file_size(path: Path) -> int:
    return path.stat().st_size


def _regular_file_size(path: Path) -> int:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise FileNotFoundError(f"{path} is not a regular file")
    return info.st_size


def http_status_error(code: ErrorCode, message: str, status: int, url: str) -> SmartVMError:
    """The error for a non-200 answer; a server error or 429 (rate limited) is worth retrying."""
    return SmartVMError(
        code, message, status_code=status, details={"url": url}, retryable=status >= 500 or status == 429
    )


def temp_path_for(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.part")


def hash_file(path: Path, *, with_md5: bool = False) -> ArtifactDigest:
    """Blocking: sha256 (and optionally md5) and size of ``path``."""
    sha = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False) if with_md5 else None
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            sha.update(chunk)
            if md5 is not None:
                md5.update(chunk)
            size += len(chunk)
    return ArtifactDigest(sha256=sha.hexdigest(), size=size, md5=md5.hexdigest() if md5 else None)


def _mismatch(expected: Expected, digest: ArtifactDigest) -> str | None:
    if expected.size is not None and digest.size != expected.size:
        return f"size {digest.size} bytes, expected {expected.size}"
    if expected.sha256 is not None and digest.sha256 != expected.sha256:
        return f"sha256 {digest.sha256}, expected {expected.sha256}"
    if expected.md5 is not None and digest.md5 is not None and digest.md5 != expected.md5:
        return f"md5 {digest.md5}, expected {expected.md5}"
    return None


async def verify_file(path: Path, expected: Expected) -> ArtifactDigest | None:
    """The digest of an existing file that matches ``expected``; ``None`` if missing or different.

    A file with nothing to verify against (no sha256, no md5) is treated as
    unverifiable and therefore not reusable.
    """
    if expected.sha256 is None and expected.md5 is None:
        return None
    try:
        size = await asyncio.to_thread(_file_size, path)
    except OSError:
        return None
    if expected.size is not None and size != expected.size:
        return None
    try:
        digest = await asyncio.to_thread(hash_file, path, with_md5=expected.md5 is not None)
    except OSError:
        return None
    return None if _mismatch(expected, digest) else digest


class _PartFile:
    """A hashing temp-file writer; blocking calls kept out of coroutine bodies on purpose."""

    def __init__(self, dest: Path, *, with_md5: bool) -> None:
        self.dest = dest
        self.temp = temp_path_for(dest)
        self._sha = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False) if with_md5 else None
        self.size = 0
        self._handle: BinaryIO | None = self.temp.open("xb")

    def write(self, chunk: bytes) -> None:
        assert self._handle is not None
        self._handle.write(chunk)
        self._sha.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)
        self.size += len(chunk)

    def digest(self) -> ArtifactDigest:
        return ArtifactDigest(
            sha256=self._sha.hexdigest(), size=self.size, md5=self._md5.hexdigest() if self._md5 else None
        )

    def commit(self) -> None:
        assert self._handle is not None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        os.replace(self.temp, self.dest)
        _fsync_dir(self.dest.parent)

    def discard(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check(expected: Expected, part: _PartFile, source: str) -> ArtifactDigest:
    digest = part.digest()
    problem = _mismatch(expected, digest)
    if problem is not None:
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_CHECKSUM_MISMATCH,
            f"{source} failed verification: {problem}",
            details={"source": source, "sha256": digest.sha256, "size": digest.size},
        )
    return digest


class _Stopped(Exception):
    """Raised inside a copy worker told to stop because its caller was cancelled."""


class _Throttle:
    def __init__(self, report: ProgressFn | None, total: int | None) -> None:
        self._report = report
        self._total = total
        self._last = -PROGRESS_STEP

    def __call__(self, done: int, phase: str = "progress") -> None:
        if self._report is not None and (phase != "progress" or done - self._last >= PROGRESS_STEP):
            self._last = done
            self._report(phase, done, self._total)


async def download_artifact(
    client: httpx.AsyncClient,
    url: str,
    dest: Path,
    expected: Expected,
    *,
    progress: ProgressFn | None = None,
) -> ArtifactDigest:
    """GET ``url`` into ``dest`` atomically, verifying ``expected``."""
    part: _PartFile | None = None
    try:
        part = _PartFile(dest, with_md5=expected.md5 is not None)
        try:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise http_status_error(
                        ErrorCode.BASE_IMAGE_DOWNLOAD_FAILED,
                        f"GET {url} returned HTTP {response.status_code}",
                        response.status_code,
                        url,
                    )
                total = _content_length(response) or expected.size
                if (expected.size is not None and total is not None and total != expected.size):
                    raise SmartVMError(
                        ErrorCode.BASE_IMAGE_CHECKSUM_MISMATCH,
                        f"{url} announces {total} bytes, expected {expected.size}",
                        details={"url": url, "size": total},
                    )
                throttle = _Throttle(progress, total)
                throttle(0, "start")
                async for chunk in response.aiter_bytes(CHUNK_SIZE):
                    part.write(chunk)
                    if expected.size is not None and part.size > expected.size:
                        raise SmartVMError(
                            ErrorCode.BASE_IMAGE_CHECKSUM_MISMATCH,
                            f"{url} sent more than the expected {expected.size} bytes",
                            details={"url": url},
                        )
                    throttle(part.size)
                throttle(part.size, "done")
        except httpx.HTTPError as exc:
            raise SmartVMError(
                ErrorCode.BASE_IMAGE_DOWNLOAD_FAILED,
                f"downloading {url} failed: {type(exc).__name__}: {exc}",
                details={"url": url, "bytes_received": part.size},
                retryable=True,
            ) from exc
        digest = _check(expected, part, url)
        part.commit()
        return digest
    except OSError as exc:
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_DOWNLOAD_FAILED,
            f"writing {dest} failed: {exc}",
            details={"url": url, "path": str(dest)},
        ) from exc
    finally:
        if part is not None:
            part.discard()


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or response.headers.get("content-encoding"):
        return None
    try:
        return int(value)
    except ValueError:
        return None


async def copy_artifact(
    src: Path,
    dest: Path,
    expected: Expected,
    *,
    progress: ProgressFn | None = None,
) -> ArtifactDigest:
    """Copy a local file into ``dest`` atomically, verifying ``expected``."""
    try:
        total = await asyncio.to_thread(_regular_file_size, src)
    except FileNotFoundError as exc:
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_NOT_FOUND,
            f"artifact {src} does not exist or is not a regular file",
            details={"path": str(src)},
        ) from exc
    except OSError as exc:
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_NOT_FOUND,
            f"artifact {src} is not readable: {exc.strerror or exc}",
            details={"path": str(src)},
        ) from exc
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def report(phase: str, done: int, size: int | None) -> None:
        if progress is not None:
            loop.call_soon_threadsafe(progress, phase, done, size)

    def work() -> ArtifactDigest:
        part = _PartFile(dest, with_md5=expected.md5 is not None)
        try:
            throttle = _Throttle(report, total)
            throttle(0, "start")
            with src.open("rb") as handle:
                while chunk := handle.read(CHUNK_SIZE):
                    if stop.is_set():
                        raise _Stopped
                    part.write(chunk)
                    throttle(part.size)
            throttle(part.size, "done")
            digest = _check(expected, part, str(src))
            part.commit()
            return digest
        finally:
            part.discard()

    future = loop.run_in_executor(None, work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        # The worker cannot be interrupted mid-chunk: tell it to stop, wait until it
        # has removed its temp file, then let the cancellation continue.
        stop.set()
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved, so asyncio does not log it as unhandled
        raise
    except OSError as exc:
        raise SmartVMError(
            ErrorCode.IMAGE_COPY_FAILED,
            f"copying {src} to {dest} failed: {exc}",
            details={"source": str(src), "path": str(dest)},
        ) from exc
