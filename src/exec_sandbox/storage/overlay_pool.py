"""Pre-created qcow2 overlays per base image, handed out by rename.

A VM needs its own writable overlay over a shared base image. Making one takes a
few milliseconds (QMP through :class:`QemuStorageDaemon`, or ``qemu-img create``
when the daemon cannot run); renaming a ready one takes microseconds. The pool
keeps up to ``pool_size_per_base`` ready overlays per base in ``pool_dir`` and
refills them in the background.

- ``acquire`` pops a ready overlay synchronously (no await between check and pop),
  so concurrent callers never get the same file.
- One refill worker makes one overlay at a time and pauses while callers are
  creating overlays on demand, so background work never queues ahead of them.
- A base whose identity (device, inode, size, mtime) changes drops its pooled overlays.
- ``pool_dir`` is locked (flock) while the pool runs; leftovers of a crashed run
  are swept on start, and everything the pool made is removed on stop.
- A ``pool_dir`` the pool creates is private (``0700``, verified) and carries an owner record
  (:mod:`smartvm.leftovers`), so the reaper that runs at every QEMU start in the same runtime
  dir keeps it while this process lives (and removes it once the process is gone). Overlays are
  created ``0600`` (the daemon and ``qemu-img`` run with umask 077).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO

from exec_sandbox.errors import QemuStorageDaemonError, SandboxInputError
from exec_sandbox.storage.daemon import QemuStorageDaemon
from exec_sandbox.storage.qcow2 import create_overlay_with_qemu_img, ensure_qcow2, get_image_info
from smartvm.cleanup import AsyncService, shielded
from smartvm.hostfs import UnsafePathError, ensure_private_dir, private_copy
from smartvm.leftovers import OWNER_FILE, new_owner_record, write_owner_record

__all__ = ["OverlayPool", "PoolState", "default_pool_size"]

logger = logging.getLogger(__name__)

_MAX_DEFAULT_POOL_SIZE = 32
_POOLED_PREFIX = "pool-"
_LOCK_FILE = ".overlay-pool.lock"
_MAX_BACKOFF = 5.0

_Identity = tuple[int, int, int, int]


class PoolState(StrEnum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def default_pool_size(max_concurrent_vms: int) -> int:
    """One ready overlay per VM that may start at once, capped (each costs ~200 KiB and a few ms)."""
    return max(1, min(max_concurrent_vms, _MAX_DEFAULT_POOL_SIZE))


def absolute_path(path: Path) -> Path:
    return Path(path).absolute()  # not resolve(): backing files keep the caller's path


def _identity(path: Path) -> _Identity | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _entry_dir_name(base: Path) -> str:
    digest = hashlib.sha256(os.fsencode(base)).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in base.stem)[:40]
    return f"{stem}-{digest}"


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove pooled overlay %s: %s", path, exc)


def _exists(path: Path) -> bool:
    return path.exists()


def _move(src: Path, dst: Path) -> None:
    """Rename a pooled overlay into place; copy across filesystems (backing paths are absolute)."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        private_copy(src, dst)  # removes a partial dst itself
        _unlink_quietly(src)


@dataclass
class _BaseEntry:
    base: Path
    directory: Path
    identity: _Identity | None
    ready: deque[Path] = field(default_factory=deque)
    failures: int = 0
    created_dir: bool = False


class OverlayPool(AsyncService):
    """Ready-made qcow2 overlays per base image; ``acquire`` is True when served from the pool."""

    def __init__(
        self,
        max_concurrent_vms: int,
        pool_dir: Path,
        *,
        daemon: QemuStorageDaemon | None = None,
        use_daemon: bool = True,
        pool_size_per_base: int | None = None,
        qemu_img: str = "qemu-img",
    ) -> None:
        if max_concurrent_vms < 1:
            raise SandboxInputError(f"max_concurrent_vms must be >= 1, got {max_concurrent_vms}")
        if pool_size_per_base is not None and pool_size_per_base < 0:
            raise SandboxInputError(f"pool_size_per_base must be >= 0, got {pool_size_per_base}")
        self._max_concurrent_vms = max_concurrent_vms
        self._pool_dir = absolute_path(pool_dir)
        self._pool_size = (
            pool_size_per_base if pool_size_per_base is not None else default_pool_size(max_concurrent_vms)
        )
        self._use_daemon = use_daemon
        self._given_daemon = daemon
        self._qemu_img = qemu_img

        self._state = PoolState.NEW
        self._lifecycle_lock = asyncio.Lock()
        self._recover_lock = asyncio.Lock()
        self._daemon: QemuStorageDaemon | None = None
        self._owns_daemon = False
        self._entries: dict[Path, _BaseEntry] = {}
        self._created_pool_dir = False
        self._lock_handle: IO[bytes] | None = None
        self._refill_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._filled = asyncio.Event()
        self._foreground = 0
        self._foreground_idle = asyncio.Event()
        self._foreground_idle.set()

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> PoolState:
        return self._state

    @property
    def daemon_enabled(self) -> bool:
        """True when overlays are made by a running qemu-storage-daemon (else ``qemu-img create``)."""
        return self._daemon is not None and self._daemon.started

    @property
    def pool_size_per_base(self) -> int:
        return self._pool_size

    @property
    def pool_dir(self) -> Path:
        return self._pool_dir

    def available(self, base: Path) -> int:
        """How many ready overlays ``base`` has right now."""
        entry = self._entries.get(absolute_path(base))
        return len(entry.ready) if entry is not None else 0

    def __repr__(self) -> str:
        ready = {str(k): len(v.ready) for k, v in self._entries.items()}
        return f"<OverlayPool state={self._state} daemon_enabled={self.daemon_enabled} ready={ready}>"


    # ------------------------------------------------------------------ lifecycle

    async def start(self, base_images: Sequence[Path] = ()) -> None:
        """Start the daemon (or fall back to qemu-img) and begin filling the pool for ``base_images``.

        Each base must be a readable qcow2 image (``QemuStorageDaemonError`` otherwise).
        Calling ``start`` again while running only registers further base images.
        """
        async with self._lifecycle_lock:
            bases = [absolute_path(b) for b in base_images]
            for base in bases:
                ensure_qcow2(base, await get_image_info(base, qemu_img=self._qemu_img))
            if self._state is PoolState.RUNNING:
                for base in bases:
                    await self._prime(self._register(base))
                self._wake.set()
                return
            self._state = PoolState.STARTING
            try:
                try:
                    self._prepare_pool_dir()
                except (OSError, UnsafePathError) as exc:
                    raise SandboxInputError(
                        f"Cannot use pool_dir {self._pool_dir}: {exc}",
                        context={"pool_dir": str(self._pool_dir)},
                    ) from exc
                await self._start_daemon()
                for base in bases:
                    self._register(base)
                # The first overlay of each base is made here, so acquire() right after start() hits.
                for base in bases:
                    await self._prime(self._entries[base])
            except BaseException:
                await shielded(self._teardown())
                self._state = PoolState.STOPPED
                raise
            self._filled.clear()
            self._wake.set()
            self._refill_task = asyncio.create_task(self._refill_loop(), name="overlay-pool-refill")
            self._state = PoolState.RUNNING

    async def stop(self) -> None:
        """Stop refilling, delete unused pooled overlays, stop the daemon the pool started. Idempotent."""
        async with self._lifecycle_lock:
            if self._state in (PoolState.NEW, PoolState.STOPPED):
                self._state = PoolState.STOPPED
                self._daemon = None
                return
            self._state = PoolState.STOPPING
            try:
                await shielded(self._teardown())
            finally:
                self._state = PoolState.STOPPED

    aclose = stop  # the one close verb of every async-with object (stop pairs with start)

    async def wait_filled(self) -> None:
        """Wait until every registered base has a full pool (bound it with ``asyncio.timeout``)."""
        self._require_running()
        await self._filled.wait()

    def _prepare_pool_dir(self) -> None:
        if not self._pool_dir.exists() and not self._pool_dir.is_symlink():
            self._pool_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._pool_dir.mkdir(mode=0o700)
            self._created_pool_dir = True
            # Ours while we live: the reaper of the runtime dir it sits in must not take it.
            write_owner_record(self._pool_dir, new_owner_record(self._pool_dir.name, kind="overlay-pool"))
        ensure_private_dir(self._pool_dir, create=False)
        lock_path = self._pool_dir / _LOCK_FILE
        while True:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            handle = os.fdopen(os.open(lock_path, flags, 0o600), "ab")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                handle.close()
                raise SandboxInputError(
                    f"pool_dir {self._pool_dir} is in use by another OverlayPool",
                    context={"pool_dir": str(self._pool_dir)},
                ) from exc
            # The previous owner unlinks the lock file on stop: make sure we locked the live one.
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(handle.fileno()).st_ino == lock_path.stat().st_ino:
                    break
            handle.close()
        self._lock_handle = handle
        # We hold the lock, so pooled files still here were left by a run that crashed.
        for stale in self._pool_dir.glob(f"*/{_POOLED_PREFIX}*.qcow2"):
            _unlink_quietly(stale)

    async def _start_daemon(self) -> None:
        if not self._use_daemon:
            return
        daemon = self._given_daemon or QemuStorageDaemon(qemu_img=self._qemu_img)
        self._owns_daemon = self._given_daemon is None
        try:
            await daemon.start()
        except QemuStorageDaemonError as exc:
            logger.warning("qemu-storage-daemon cannot run, overlays fall back to qemu-img create: %s", exc)
            if self._owns_daemon:
                await daemon.stop()
            self._owns_daemon = False
            return
        self._daemon = daemon

    async def _teardown(self) -> None:
        task, self._refill_task = self._refill_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("overlay pool refill worker had failed")
        for entry in self._entries.values():
            while entry.ready:
                _unlink_quietly(entry.ready.popleft())
            if entry.created_dir:
                with contextlib.suppress(OSError):
                    entry.directory.rmdir()
        self._entries.clear()
        if self._lock_handle is not None:
            _unlink_quietly(self._pool_dir / _LOCK_FILE)  # while still holding it; see _prepare_pool_dir
            self._lock_handle.close()
            self._lock_handle = None
        if self._created_pool_dir:
            _unlink_quietly(self._pool_dir / OWNER_FILE)
            with contextlib.suppress(OSError):
                self._pool_dir.rmdir()
            self._created_pool_dir = False
        daemon, self._daemon = self._daemon, None
        if daemon is not None and self._owns_daemon:
            await daemon.stop()
        self._owns_daemon = False

    # ------------------------------------------------------------------ registry

    def _register(self, base: Path) -> _BaseEntry:
        entry = self._entries.get(base)
        if entry is not None:
            return entry
        directory = self._pool_dir / _entry_dir_name(base)
        created = not directory.exists()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        entry = _BaseEntry(base=base, directory=directory, identity=_identity(base), created_dir=created)
        self._entries[base] = entry
        self._filled.clear()
        return entry

    def _revalidate(self, entry: _BaseEntry) -> None:
        """Drop pooled overlays made while the base file was a different file or version."""
        current = _identity(entry.base)
        if current == entry.identity:
            return
        logger.info("base image %s changed; discarding %d pooled overlays", entry.base, len(entry.ready))
        while entry.ready:
            _unlink_quietly(entry.ready.popleft())
        entry.identity = current
        entry.failures = 0
        self._filled.clear()
        self._wake.set()

    def _require_running(self) -> None:
        if self._state is not PoolState.RUNNING:
            raise SandboxInputError(f"OverlayPool is not running (state: {self._state})")

    # ------------------------------------------------------------------ acquire

    async def acquire(self, base: Path, target: Path) -> bool:
        """Put a fresh qcow2 overlay over ``base`` at ``target`` (which must not exist).

        Returns True when a pre-created overlay was renamed into place, False when
        one had to be created on demand (the base is then pooled from now on).
        """
        self._require_running()
        base, target = absolute_path(base), absolute_path(target)
        if target.exists() or target.is_symlink():
            raise SandboxInputError(
                f"Overlay target {target} already exists", context={"target": str(target)}
            )
        entry = self._entries.get(base)
        if entry is not None:
            self._revalidate(entry)
            while entry.ready:
                pooled = entry.ready.popleft()
                self._filled.clear()
                self._wake.set()
                try:
                    _move(pooled, target)
                except OSError:
                    if not _exists(pooled):
                        continue  # removed behind our back; try the next one
                    # The target side is the problem (missing dir, permissions): keep the pooled
                    # file and let on-demand creation report it like any other request.
                    entry.ready.appendleft(pooled)
                    break
                return True

        self._foreground += 1
        self._foreground_idle.clear()
        try:
            await self._create(base, target)
        finally:
            self._foreground -= 1
            if self._foreground == 0:
                self._foreground_idle.set()
        if entry is None and self._state is PoolState.RUNNING:
            self._register(base)
            self._wake.set()
        return False

    async def _create(self, base: Path, target: Path) -> None:
        daemon = self._daemon
        if daemon is not None:
            try:
                await daemon.create_overlay(base, target)
                return
            except QemuStorageDaemonError:
                if daemon.started or self._state is not PoolState.RUNNING:
                    raise  # the request itself failed (bad base, unwritable target ...), or we are stopping
            daemon = await self._recover_daemon(daemon)
            if daemon is not None:
                await daemon.create_overlay(base, target)
                return
        await create_overlay_with_qemu_img(base, target, qemu_img=self._qemu_img)

    async def _recover_daemon(self, dead: QemuStorageDaemon) -> QemuStorageDaemon | None:
        """The daemon died under us: restart it once, else continue with qemu-img."""
        async with self._recover_lock:
            if self._daemon is not dead:
                return self._daemon  # someone else already handled it
            if dead.started:
                return dead
            logger.warning("qemu-storage-daemon died (%s); restarting it", dead.stderr_tail() or "no stderr")
            try:
                await dead.start()
            except QemuStorageDaemonError as exc:
                logger.warning("restarting qemu-storage-daemon failed, falling back to qemu-img: %s", exc)
                if self._owns_daemon:
                    await dead.stop()
                self._daemon = None
                return None
            return dead

    # ------------------------------------------------------------------ refill

    def _next_deficit(self) -> _BaseEntry | None:
        for entry in list(self._entries.values()):
            self._revalidate(entry)
        short = [e for e in self._entries.values() if len(e.ready) < self._pool_size]
        return min(short, key=lambda e: (e.failures, len(e.ready)), default=None)

    async def _refill_loop(self) -> None:
        while True:
            entry = self._next_deficit()
            if entry is None:
                self._filled.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._foreground_idle.wait()
            if entry.failures:
                await asyncio.sleep(min(0.05 * 2**entry.failures, _MAX_BACKOFF))
            try:
                await self._fill_one(entry)
            except Exception as exc:  # keep the worker alive; the next round retries with backoff
                entry.failures += 1
                logger.warning(
                    "refilling overlays for %s failed (%d times): %s", entry.base, entry.failures, exc
                )

    async def _prime(self, entry: _BaseEntry) -> None:
        """Make the first overlay of a base inline: bad bases fail start(), and the first acquire hits."""
        if self._pool_size > 0 and not entry.ready:
            await self._fill_one(entry)

    async def _fill_one(self, entry: _BaseEntry) -> None:
        identity = entry.identity
        path = entry.directory / f"{_POOLED_PREFIX}{uuid.uuid4().hex}.qcow2"
        await self._create(entry.base, path)
        if self._entries.get(entry.base) is not entry or entry.identity != identity:
            _unlink_quietly(path)  # the base changed while we were creating it
            return
        entry.failures = 0
        entry.ready.append(path)
