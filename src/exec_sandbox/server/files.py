"""``GET``/``POST /files`` (download / upload, ``multipart/form-data`` or ``application/octet-stream``,
capped at ``max_upload_bytes``) inside the guest work dir, and ``GET /health``: the plain-HTTP part of
the in-sandbox daemon API (the Connect services are in :mod:`exec_sandbox.server.envd`)."""

from __future__ import annotations

import asyncio
import posixpath
import shlex
import tempfile
from collections.abc import AsyncIterator
from typing import IO, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from exec_sandbox.errors import SandboxError, SandboxInputError
from exec_sandbox.server.envd import CURRENT_SANDBOX, E2B_HOME, FS_TIMEOUT_S, e2b_path, guest_path
from exec_sandbox.server.errors import BadRequestError, ServeError
from exec_sandbox.server.registry import SandboxRecord
from exec_sandbox.validation import DEFAULT_WORKDIR

__all__ = ["download", "envd_routes", "health", "upload"]

_CHUNK: Final = 256 * 1024

def _workdir_rel(path: str) -> str:
    full = guest_path(path)
    if full != DEFAULT_WORKDIR and not full.startswith(DEFAULT_WORKDIR + "/"):
        raise BadRequestError(
            f"path {path!r} is outside the sandbox home ({E2B_HOME} = {DEFAULT_WORKDIR}); "
            "sbx serve reads and writes files there only"
        )
    return posixpath.relpath(full, DEFAULT_WORKDIR)


def _guest_error(exc: SandboxError, path: str) -> ServeError:
    text = exc.message
    if isinstance(exc, SandboxInputError):
        return BadRequestError(text)
    low = text.lower()
    if "no such file" in low or "not found" in low or "does not exist" in low:
        return ServeError(f"path {path!r} not found", status=404)
    if "is a directory" in low:
        return BadRequestError(f"path {path!r} is a directory")
    return ServeError(f"sandbox error: {text}", status=502)


async def download(request: Request) -> Response:
    """``GET /files``: the guest file goes through an unnamed 0600 temp file, then streams out."""
    record = CURRENT_SANDBOX.get()
    path = request.query_params.get("path", "")
    rel = _workdir_rel(path)
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - handed on, closed by its consumer
    try:
        try:
            await record.session.read_file(rel, spool)
        except SandboxError as exc:
            raise _guest_error(exc, path) from None
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(spool.read, _CHUNK):
                yield chunk
        finally:
            spool.close()

    return StreamingResponse(
        chunks(), media_type="application/octet-stream", headers={"content-length": str(size)}
    )


async def _spool_capped(request: Request, limit: int) -> IO[bytes]:
    """The request body in an unnamed temp file; more than ``limit`` bytes is a 413."""
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - handed on, closed by its consumer
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServeError(f"upload larger than the limit of {limit} bytes", status=413)
            await asyncio.to_thread(spool.write, chunk)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


async def upload(request: Request) -> Response:
    """``POST /files``: multipart (one part per file) or an octet-stream body for ``?path=``."""
    record = CURRENT_SANDBOX.get()
    limit = record.max_upload_bytes
    ctype = request.headers.get("content-type", "")
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise BadRequestError("compressed uploads are not supported by sbx serve")
    written = []
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=100, max_part_size=limit)
        try:
            for key, value in form.multi_items():
                if isinstance(value, str):
                    continue
                if value.size is not None and value.size > limit:
                    raise ServeError(f"upload larger than the limit of {limit} bytes", status=413)
                name = request.query_params.get("path") or value.filename or key
                await value.seek(0)
                written.append(await _store(record, name, value.file))
        finally:
            await form.close()
    else:
        spool = await _spool_capped(request, limit)
        try:
            written.append(await _store(record, request.query_params.get("path", ""), spool))
        finally:
            spool.close()
    return JSONResponse(written)


async def _store(record: SandboxRecord, path: str, data: IO[bytes]) -> dict[str, str]:
    rel = _workdir_rel(path)
    parent = posixpath.dirname(rel)
    try:
        if parent:
            mk = await record.session.exec(
                f"mkdir -p -- {shlex.quote(posixpath.join(DEFAULT_WORKDIR, parent))}",
                timeout_seconds=FS_TIMEOUT_S,
            )
            if mk.exit_code != 0:
                raise BadRequestError(f"cannot create the directory of {path!r}: {mk.stderr.strip()}")
        await record.session.write_file(rel, data)
    except ServeError:
        raise
    except SandboxError as exc:
        raise _guest_error(exc, path) from None
    full = posixpath.join(DEFAULT_WORKDIR, rel)
    return {"name": posixpath.basename(full), "type": "file", "path": e2b_path(full)}


async def health(request: Request) -> Response:
    return Response(status_code=204)


def envd_routes() -> list[Route]:
    return [
        Route("/files", download, methods=["GET"]),
        Route("/files", upload, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
