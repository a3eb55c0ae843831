"""Host filesystem safety: private directories, symlink-proof deletion, atomic private writes.

Every other local user is hostile (see the project's threat model). So everything the library
puts on the host goes through this module:

* :func:`ensure_private_dir` creates missing components ``0700`` and proves the final directory is
  ours: ``lstat``/``O_NOFOLLOW`` (not a symlink), owned by our euid, no group/other bits. Every
  existing ancestor must be trustworthy too (owned by root or us; writable by others only when
  sticky, like ``/tmp``), else whoever controls it could swap the path under us. Anything else is an
  :class:`UnsafePathError` naming the path and what is wrong. A directory we own that is merely
  readable by others (``0755``, as older versions made them) is tightened to ``0700`` through its
  descriptor; one writable by others is refused (its contents may have been planted).
* :func:`open_private_dir` gives a descriptor of such a verified directory, for ``dir_fd`` walks;
  :func:`remove_at` deletes one entry below it without following any symlink (``shutil.rmtree``
  with ``dir_fd`` is descriptor-based on Linux; its root is checked here first).
* :func:`atomic_write_file` and :func:`atomic_writer` are THE way the project writes a host file:
  a temporary sibling made by :func:`tempfile.mkstemp` (``O_CREAT|O_EXCL|O_NOFOLLOW``, a random
  name, mode ``0600`` from creation), then one ``rename`` (or ``link`` when an existing file must
  not be replaced). A symlink at the final path is refused unless ``follow_symlinks``; a rename
  never follows one (it replaces the entry, not the file it points to).
* :func:`private_copy` copies a file into a new ``0600`` file (``O_EXCL|O_NOFOLLOW``).

Errors::

    SmartVMError
    └── UnsafePathError      .path, .problem  (code UNSAFE_PATH, or PATH_EXISTS for overwrite=False)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from smartvm.errors import ErrorCode, SmartVMError

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "AtomicWriter",
    "UnsafePathError",
    "atomic_write_file",
    "atomic_writer",
    "ensure_private_dir",
    "open_private_dir",
    "open_trusted_dir",
    "private_copy",
    "private_file",
    "remove_at",
    "verify_private_dir",
]

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 1 << 20


class UnsafePathError(SmartVMError):
    """A host path the library was about to use is not safe; nothing was written or removed.

    ``path``: the offending path; ``problem``: what is wrong, in words (``"is a symbolic link"``,
    ``"owned by uid 1001"``, ``"writable by group or others (mode 0o777)"``, ``"exists"``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        problem: str,
        *,
        code: ErrorCode | str = ErrorCode.UNSAFE_PATH,
        hint: str = "",
    ) -> None:
        message = f"refusing to use {os.fspath(path)}: it {problem}" + (f"; {hint}" if hint else "")
        super().__init__(code, message, details={"path": os.fspath(path), "problem": problem})
        self.path = Path(path)
        self.problem = problem


# --------------------------------------------------------------------------- directories


def _trusted_ancestor_problem(path: Path, euid: int) -> str | None:
    """Why ``path`` (an existing ancestor) could be swapped by someone else, or None."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, euid):
                return f"is a symbolic link owned by uid {st.st_uid}"
            st = os.stat(path)
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, euid):
        return f"is owned by uid {st.st_uid}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"is writable by group or others without the sticky bit (mode {oct(st.st_mode & 0o7777)})"
    return None


def _verify_fd(fd: int, path: Path, euid: int, *, tighten: bool) -> None:
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(path, "is not a directory")
    if st.st_uid != euid:
        raise UnsafePathError(path, f"is owned by uid {st.st_uid}, not by us (uid {euid})")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise UnsafePathError(path, f"is writable by group or others (mode {oct(mode)})")
    if mode & 0o077:
        if not tighten:
            raise UnsafePathError(path, f"is readable by group or others (mode {oct(mode)})")
        # Ours and writable by nobody else: nothing can have been planted; close it to readers.
        os.fchmod(fd, mode & ~0o077)
        log.info("tightened %s from %s to %s", path, oct(mode), oct(mode & ~0o077))


def _open_final(path: Path) -> int:
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePathError(path, "is a symbolic link") from exc
        if isinstance(exc, FileNotFoundError):
            raise
        if isinstance(exc, NotADirectoryError):
            raise UnsafePathError(path, "is not a directory") from exc
        raise UnsafePathError(path, f"cannot be opened ({exc.strerror or exc})") from exc


def open_private_dir(path: str | os.PathLike[str], *, create: bool = False, tighten: bool = True) -> int:
    """A descriptor (``O_DIRECTORY|O_NOFOLLOW``) of the verified private directory ``path``.

    ``create``: make missing components ``0700`` first. FileNotFoundError when it does not exist
    and ``create`` is False; :class:`UnsafePathError` when it (or an ancestor) is not safe.
    The caller closes the descriptor.
    """
    target = Path(os.path.abspath(path))
    euid = os.geteuid()
    current = Path(target.anchor)
    parts = target.parts[1:]
    for index, name in enumerate(parts):
        current = current / name
        last = index == len(parts) - 1
        if create and not os.path.lexists(current):
            try:
                os.mkdir(current, PRIVATE_DIR_MODE)
            except FileExistsError:
                pass
            except OSError as exc:
                raise UnsafePathError(current, f"cannot be created ({exc.strerror or exc})") from exc
        if not last:
            if not create and not os.path.lexists(current):
                raise FileNotFoundError(f"{current} does not exist")
            problem = _trusted_ancestor_problem(current, euid)
            if problem is not None:
                raise UnsafePathError(current, problem, hint=f"it is an ancestor of {target}")
    fd = _open_final(target)
    try:
        _verify_fd(fd, target, euid, tighten=tighten)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_trusted_dir(path: str | os.PathLike[str]) -> int:
    """A descriptor of ``path``, a directory nobody but root and us can rearrange.

    For scanning a shared base such as ``/tmp``: owned by root or us, and writable by others only
    with the sticky bit (then others cannot rename or remove our entries in it). Not a symlink.
    """
    target = Path(os.path.abspath(path))
    fd = _open_final(target)
    try:
        st = os.fstat(fd)
        problem = None
        if st.st_uid not in (0, os.geteuid()):
            problem = f"is owned by uid {st.st_uid}"
        elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            problem = (
                f"is writable by group or others without the sticky bit (mode {oct(st.st_mode & 0o7777)})"
            )
        if problem is not None:
            raise UnsafePathError(target, problem)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_private_dir(path: str | os.PathLike[str], *, create: bool = True, tighten: bool = True) -> Path:
    """Create (``create``) and verify the private directory ``path``; return it as an absolute Path.

    Verified: not a symlink, a directory, owned by our euid, no group/other bits (a dir of ours
    that others may only read is tightened to ``0700`` unless ``tighten`` is False), and every
    ancestor owned by root or us and not writable by others unless sticky. Else
    :class:`UnsafePathError`; FileNotFoundError when missing and ``create`` is False.
    """
    fd = open_private_dir(path, create=create, tighten=tighten)
    os.close(fd)
    return Path(os.path.abspath(path))


def verify_private_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` exists and passes :func:`ensure_private_dir` without changes."""
    try:
        fd = open_private_dir(path, create=False, tighten=False)
    except (OSError, UnsafePathError):
        return False
    os.close(fd)
    return True


def remove_at(dir_fd: int, name: str, *, dir_path: str | os.PathLike[str] = "") -> bool:
    """Remove entry ``name`` of the directory open as ``dir_fd`` (a file, symlink or whole tree).

    Never follows a symlink: a symlink entry is unlinked itself, a directory is removed with the
    descriptor-based ``shutil.rmtree`` (which does not follow symlinks inside it). ``name`` must be
    a plain name. True if something was removed; errors are logged, not raised.
    """
    if not name or name in (".", "..") or "/" in name:
        raise ValueError(f"not a plain directory entry name: {name!r}")
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    where = os.path.join(os.fspath(dir_path), name) if dir_path else name
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("could not remove %s: %s", where, exc)
        return False
    return True


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def private_file(path: str | os.PathLike[str], *, mode: int = PRIVATE_FILE_MODE) -> Iterator[IO[bytes]]:
    """Create ``path`` (which must not exist; a symlink there is refused) as a new ``mode`` file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as fh:
        yield fh


def private_copy(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, mode: int = PRIVATE_FILE_MODE
) -> None:
    """Copy ``src`` into the new file ``dst`` (``O_EXCL|O_NOFOLLOW``, ``mode`` from creation).

    The source is opened without following a final symlink. A partial ``dst`` is removed on failure.
    """
    with open(os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fin:
        try:
            with private_file(dst, mode=mode) as fout:
                size = os.fstat(fin.fileno()).st_size
                offset = 0
                while offset < size:
                    sent = os.sendfile(
                        fout.fileno(), fin.fileno(), offset, min(_COPY_CHUNK * 64, size - offset)
                    )
                    if sent == 0:
                        break
                    offset += sent
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
            raise


class AtomicWriter:
    """Write a host file atomically and privately; use :func:`atomic_writer` to make one.

    ``file``: the open temporary file (binary, write-only) to write chunks to. On :meth:`commit`
    (done by a clean ``with`` exit) it is flushed (``fsync`` when asked) and published under
    ``target``; on :meth:`abort` (done by an exception, including cancellation) it is removed and
    ``target`` is untouched. Usable from asyncio code: writes are plain blocking file writes
    (offload big ones with ``asyncio.to_thread(writer.file.write, chunk)``).
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        mode: int = PRIVATE_FILE_MODE,
        overwrite: bool = True,
        follow_symlinks: bool = False,
        fsync: bool = False,
    ) -> None:
        path = Path(os.path.abspath(target))
        if os.path.islink(path):
            if not follow_symlinks:
                raise UnsafePathError(
                    path, "is a symbolic link", hint="refusing to write through it; give the real path"
                )
            path = Path(os.path.realpath(path))
        if os.path.isdir(path) and not os.path.islink(path):
            raise UnsafePathError(path, "is a directory")
        if not overwrite and os.path.lexists(path):
            raise UnsafePathError(path, "exists", code=ErrorCode.PATH_EXISTS)
        self.target = path
        self._overwrite = overwrite
        self._fsync = fsync
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        self.tmp_path = Path(tmp)
        try:
            if mode != PRIVATE_FILE_MODE:
                os.fchmod(fd, mode)
            self.file: IO[bytes] = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        self._done = False

    def commit(self) -> Path:
        """Publish the written bytes under ``target`` (once); returns ``target``."""
        if self._done:
            return self.target
        self._done = True
        try:
            self.file.flush()
            if self._fsync:
                os.fsync(self.file.fileno())
            self.file.close()
            if self._overwrite:
                os.replace(self.tmp_path, self.target)  # replaces a symlink entry; never follows it
            else:
                try:
                    os.link(self.tmp_path, self.target)  # fails on any existing entry, symlinks too
                except FileExistsError:
                    raise UnsafePathError(self.target, "exists", code=ErrorCode.PATH_EXISTS) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)
        return self.target

    def abort(self) -> None:
        """Drop the temporary file; ``target`` stays as it was. Idempotent."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_writer(
    target: str | os.PathLike[str],
    *,
    mode: int = PRIVATE_FILE_MODE,
    overwrite: bool = True,
    follow_symlinks: bool = False,
    fsync: bool = False,
) -> AtomicWriter:
    """A streaming atomic write of ``target``, as a context manager yielding an :class:`AtomicWriter`.

    ::

        with atomic_writer(dest, overwrite=False) as out:
            for chunk in chunks:
                out.file.write(chunk)
        # complete file published under dest here; on any exception, dest untouched

    ``mode``: the file's permissions from creation (default ``0600``). ``overwrite=False``: an
    existing entry at ``target`` is never replaced (:class:`UnsafePathError`, code ``PATH_EXISTS``;
    checked up front and again, race-free, when publishing with ``link``). ``follow_symlinks``:
    write to the file a symlink at ``target`` points to; by default such a symlink is refused
    (:class:`UnsafePathError`). The temporary file is ``.<name>.<random>.part`` beside ``target``.
    """
    return AtomicWriter(target, mode=mode, overwrite=overwrite, follow_symlinks=follow_symlinks, fsync=fsync)


def atomic_write_file(
    target: str | os.PathLike[str],
    data: bytes | Iterable[bytes],
    *,
    mode: int = PRIVATE_FILE_MODE,
    overwrite: bool = True,
    follow_symlinks: bool = False,
    fsync: bool = False,
) -> Path:
    """Write ``data`` (bytes or an iterable of chunks) to ``target`` atomically; see :func:`atomic_writer`."""
    with atomic_writer(
        target, mode=mode, overwrite=overwrite, follow_symlinks=follow_symlinks, fsync=fsync
    ) as out:
        if isinstance(data, bytes | bytearray | memoryview):
            out.file.write(data)
        else:
            for chunk in data:
                out.file.write(chunk)
    return out.target
