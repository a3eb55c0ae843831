"""File transfer over the agent connection: writes in chunks, reads capped by the host as bytes arrive.

Downloads to a host path go through :func:`smartvm.hostfs.atomic_writer` (a private 0600 temp file in
the target's directory, renamed into place); :meth:`FileTransfer.iter_file` streams in bounded memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import inspect
import io
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any, TypeVar, overload

from exec_sandbox.client.connection import (
    DEFAULT_MAX_READ_BYTES,
    AgentClientState,
    AgentConnection,
    build_model,
    unexpected_frame,
)
from exec_sandbox.errors import (
    GuestAgentError,
    GuestFileTooLargeError,
    GuestProtocolError,
    SandboxError,
    SandboxInputError,
)
from exec_sandbox.protocol.agent import (
    DEFAULT_CHUNK_BYTES,
    CancelRequest,
    FileChunk,
    FileEntry,
    ListFilesRequest,
    ListResult,
    ReadFileRequest,
    ReadResult,
    WriteChunk,
    WriteFileRequest,
    WriteResult,
)
from smartvm.hostfs import UnsafePathError, atomic_writer

__all__ = ["FileTransfer"]

logger = logging.getLogger(__name__)
_R = TypeVar("_R")


class FileTransfer(AgentConnection):
    """The file requests of an agent connection (write, read, iterate, list)."""

    # ------------------------------------------------------------------ files

    async def write_file(
        self,
        path: str,
        data: bytes | Path | IO[bytes],
        *,
        make_executable: bool = False,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        timeout: float = 300.0,
    ) -> WriteResult:
        """Upload ``data`` to ``path`` (relative to the guest work dir) in sha256-checked chunks.

        The guest writes a temporary file and renames it into place only when the whole-file
        sha256 matches, so a failed upload leaves nothing behind.
        """
        if not 1 <= chunk_size <= 1024 * 1024 * 2:
            raise SandboxInputError("chunk_size must be between 1 byte and 2 MiB")
        with _open_source(data) as (fh, size):
            digest = await asyncio.to_thread(_sha256_of, fh)
            request = build_model(WriteFileRequest, id=self._new_id(), path=path, size=size, sha256=digest,
                             make_executable=make_executable)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            async with self._request(request) as (req_id, pending):
                fh.seek(0)
                seq = 0
                sent = 0
                while sent < size:
                    if not pending.empty():
                        break  # the agent already answered (an error): stop streaming
                    chunk = fh.read(min(chunk_size, size - sent))
                    if not chunk:
                        raise SandboxInputError(f"source for {path!r} shrank while uploading")
                    await self._send(WriteChunk(
                        id=req_id, seq=seq, data=base64.b64encode(chunk).decode(),
                        sha256=hashlib.sha256(chunk).hexdigest()))
                    seq += 1
                    sent += len(chunk)
                result = await self._expect(req_id, pending, WriteResult, deadline - loop.time())
        if result.sha256 != digest or result.size != size:
            raise GuestAgentError(
                f"the guest stored {result.size} bytes with sha256 {result.sha256}, sent {size} / {digest}",
                context={"path": path},
            )
        return result

    @overload
    async def read_file(self, path: str, destination: None = None, *, chunk_size: int = ...,
                        timeout: float = ..., max_bytes: int | None = ...) -> bytes: ...

    @overload
    async def read_file(self, path: str, destination: Path | IO[bytes], *, chunk_size: int = ...,
                        timeout: float = ..., max_bytes: int | None = ...) -> ReadResult: ...

    async def read_file(
        self,
        path: str,
        destination: Path | IO[bytes] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        timeout: float = 300.0,
        max_bytes: int | None = DEFAULT_MAX_READ_BYTES,
    ) -> bytes | ReadResult:
        """Download ``path``: into memory (returns bytes) or into ``destination`` (returns ReadResult).

        Every chunk and the whole file are sha256-checked. Bytes are counted as they arrive: past
        ``max_bytes`` (None: no cap - only sensible with a destination) the transfer ends with
        :class:`GuestFileTooLargeError` and nothing beyond the cap is kept. In memory the file costs
        its size once (one growing buffer, no join). A ``Path`` destination is written to a private
        temporary sibling (``mkstemp``, 0600) and atomically renamed into place when complete; a
        symlink at ``destination`` is refused. For a large file prefer a ``Path`` or :meth:`iter_file`.
        """
        if destination is None:
            buffer = io.BytesIO()
            await self._read_into(path, buffer.write, chunk_size, timeout, max_bytes)
            return buffer.getvalue()
        if isinstance(destination, Path):
            return await _write_file_atomically(
                destination, lambda write: self._read_into(path, write, chunk_size, timeout, max_bytes))
        sink = destination
        return await self._read_into(path, lambda chunk: asyncio.to_thread(sink.write, chunk), chunk_size,
                                     timeout, max_bytes)

    async def iter_file(
        self,
        path: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        timeout: float = 300.0,
        max_bytes: int | None = DEFAULT_MAX_READ_BYTES,
    ) -> AsyncGenerator[bytes, None]:
        """Stream ``path`` chunk by chunk (each <= ``chunk_size``), with bounded host memory.

        Each chunk is sha256-checked before it is yielded; the whole file's size and sha256 are
        checked when the guest ends the transfer (a mismatch raises after the last chunk, so treat
        the data as unconfirmed until the iteration ends normally). ``max_bytes`` as in
        :meth:`read_file`. Close the iterator (``contextlib.aclosing``) if you stop early.
        """
        async with contextlib.aclosing(self._read_chunks(path, chunk_size, timeout, max_bytes)) as chunks:
            async for item in chunks:
                if isinstance(item, bytes):
                    yield item

    async def _read_into(
        self,
        path: str,
        write: Callable[[bytes], object],
        chunk_size: int,
        timeout: float,
        max_bytes: int | None,
    ) -> ReadResult:
        """Read ``path`` into ``write`` (sync, or returning an awaitable that is awaited)."""
        result: ReadResult | None = None
        async with contextlib.aclosing(self._read_chunks(path, chunk_size, timeout, max_bytes)) as chunks:
            async for item in chunks:
                if isinstance(item, ReadResult):
                    result = item
                else:
                    written = write(item)
                    if inspect.isawaitable(written):
                        await written
        assert result is not None  # _read_chunks ends with the result or raises
        return result

    async def _read_chunks(
        self, path: str, chunk_size: int, timeout: float, max_bytes: int | None
    ) -> AsyncGenerator[bytes | ReadResult, None]:
        """The chunks of ``path`` as they arrive (counted, checked), then the guest's ReadResult."""
        if max_bytes is not None and max_bytes < 0:
            raise SandboxInputError("max_bytes must be >= 0", context={"max_bytes": max_bytes})
        request = build_model(ReadFileRequest, id=self._new_id(), path=path, chunk_size=chunk_size)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        whole = hashlib.sha256()
        async with self._request(request) as (req_id, pending):
            finished = False
            try:
                seq = offset = 0
                while True:
                    msg = await self._next(req_id, pending, deadline - loop.time())
                    if isinstance(msg, FileChunk):
                        chunk = self._chunk_bytes(msg, req_id, path, seq, offset, chunk_size)
                        if max_bytes is not None and offset + len(chunk) > max_bytes:
                            raise GuestFileTooLargeError(
                                f"{path!r} is larger than the {max_bytes}-byte cap of this read: "
                                f"{offset + len(chunk)} bytes had arrived when the host stopped it",
                                path=path, limit_bytes=max_bytes, received_bytes=offset + len(chunk),
                                context={"request_id": req_id})
                        whole.update(chunk)
                        seq += 1
                        offset += len(chunk)
                        yield chunk
                    elif isinstance(msg, ReadResult):
                        if msg.size != offset or msg.chunks != seq or msg.sha256 != whole.hexdigest():
                            raise self._violation(GuestProtocolError(
                                f"downloaded {offset} bytes / {seq} chunks with sha256 {whole.hexdigest()}, "
                                f"the guest announced {msg.size} / {msg.chunks} / {msg.sha256}",
                                reason="bad_read_result", request_id=req_id, received_bytes=offset,
                                context={"path": path}))
                        finished = pending.completed = True
                        yield msg
                        return
                    else:
                        raise self._violation(unexpected_frame(req_id, msg, "file_chunk/read_result"))
            finally:
                if not finished and self._state is AgentClientState.READY:
                    # Ended early (cap, error, cancellation): ask the agent to stop (best effort;
                    # whatever it still sends for this request is dropped on arrival).
                    with contextlib.suppress(SandboxError, OSError, ConnectionError):
                        await asyncio.shield(self._send_and_forget(CancelRequest(id=self._new_id(),
                                                                                 target=req_id)))

    def _chunk_bytes(self, msg: FileChunk, req_id: str, path: str, seq: int, offset: int,
                     chunk_size: int) -> bytes:
        """The checked bytes of one file chunk; anything wrong is the guest's protocol violation."""
        if msg.seq != seq or msg.offset != offset:
            raise self._violation(GuestProtocolError(
                f"file chunk out of order (got {msg.seq} at {msg.offset}, want {seq} at {offset})",
                reason="bad_chunk", request_id=req_id, context={"path": path}))
        try:
            chunk = base64.b64decode(msg.data, validate=True)
        except ValueError:
            raise self._violation(GuestProtocolError(
                "file chunk is not valid base64", reason="bad_chunk", request_id=req_id,
                context={"path": path})) from None
        if len(chunk) > chunk_size:
            raise self._violation(GuestProtocolError(
                f"file chunk of {len(chunk)} bytes, more than the {chunk_size} asked for",
                reason="bad_chunk", request_id=req_id, limit_bytes=chunk_size,
                received_bytes=len(chunk), context={"path": path}))
        if hashlib.sha256(chunk).hexdigest() != msg.sha256:
            raise self._violation(GuestProtocolError(
                f"file chunk {seq} failed its sha256 check", reason="bad_chunk", request_id=req_id,
                context={"path": path}))
        return chunk

    async def list_files(self, path: str = ".", timeout: float = 30.0) -> list[FileEntry]:
        request = build_model(ListFilesRequest, id=self._new_id(), path=path)
        async with self._request(request) as (req_id, pending):
            result = await self._expect(req_id, pending, ListResult, timeout)
        if result.truncated is not None:
            logger.warning("listing of %s has %d entries; the first %d by name were sent",
                           path, result.truncated, len(result.entries))
        return result.entries


async def _write_file_atomically(
    destination: Path, produce: Callable[[Callable[[bytes], object]], Awaitable[_R]]
) -> _R:
    """Write what ``produce`` emits to ``destination`` through :func:`smartvm.hostfs.atomic_writer`.

    A private temp file beside ``destination``, renamed over it only when ``produce`` succeeded and
    removed otherwise; a symlink (or a directory) at ``destination`` is refused. Unsafe or unwritable
    host paths are the caller's input (:class:`SandboxInputError` naming the path).
    """
    try:
        writer = await asyncio.to_thread(atomic_writer, destination)
    except (UnsafePathError, OSError) as exc:
        raise SandboxInputError(f"cannot write {destination}: {exc}",
                                context={"path": str(destination)}) from exc
    with writer:
        result = await produce(lambda chunk: asyncio.to_thread(writer.file.write, chunk))
        try:
            await asyncio.to_thread(writer.commit)
        except (UnsafePathError, OSError) as exc:
            raise SandboxInputError(f"cannot write {destination}: {exc}",
                                    context={"path": str(destination)}) from exc
    return result


def _sha256_of(fh: IO[bytes]) -> str:
    h = hashlib.sha256()
    fh.seek(0)
    for block in iter(lambda: fh.read(1024 * 1024), b""):
        h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _open_source(data: bytes | Path | IO[bytes]) -> Any:
    import io

    if isinstance(data, bytes | bytearray | memoryview):
        buf = io.BytesIO(bytes(data))
        yield buf, len(buf.getbuffer())
    elif isinstance(data, Path):
        try:
            fh = data.open("rb")
        except OSError as exc:
            raise SandboxInputError(f"cannot read {data}: {exc}", context={"path": str(data)}) from exc
        with fh:
            yield fh, os.fstat(fh.fileno()).st_size
    else:
        if not data.seekable():
            # One pass to a spool keeps memory bounded while still knowing size and hash up front.
            import tempfile

            with tempfile.TemporaryFile() as spool:
                for block in iter(lambda: data.read(1024 * 1024), b""):
                    spool.write(block)
                size = spool.tell()
                yield spool, size
        else:
            start = data.tell()
            data.seek(0, os.SEEK_END)
            size = data.tell() - start
            data.seek(start)
            yield _Offset(data, start), size


class _Offset:
    """A seekable file viewed from ``start`` (so seek(0) means the caller's position)."""

    def __init__(self, fh: IO[bytes], start: int) -> None:
        self._fh, self._start = fh, start

    def seek(self, pos: int) -> int:
        return self._fh.seek(self._start + pos) - self._start

    def read(self, n: int = -1) -> bytes:
        return self._fh.read(n)
