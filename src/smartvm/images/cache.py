"""The on-disk base-image cache: layout, per-bundle locks, LRU choice.

Layout::

    <cache_dir>/
    ├── .locks/<bundle_id>.lock     flock(2) target, one per bundle, never deleted
    ├── <bundle_id>/
    │   ├── manifest.json           BaseImageBundle, rewritten atomically
    │   ├── vmlinux                 (file names come from the manifest)
    │   └── rootfs.ext4
    └── .trash-<bundle_id>-<rand>/  a bundle being deleted (renamed first, so it vanishes atomically)

Locks live outside the bundle directory so deleting a bundle never deletes the
lock another process is waiting on. ``flock`` locks belong to an open file
description, so the same lock also serialises coroutines of one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.manifest import (
    MANIFEST_FILE_NAME,
    BaseImageBundle,
    parse_bundle_manifest,
    validate_bundle_id,
)

__all__ = ["BundleCache", "BundleLock", "lru_victims"]

log = logging.getLogger(__name__)

LOCK_POLL_INTERVAL = 0.05


class BundleLock:
    """An exclusive, cancellation-safe, inter-process lock on one bundle."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    async def acquire(self) -> None:
        # Polling rather than a blocking flock in a thread: a cancelled waiter must
        # not leave a thread behind that later takes the lock and never drops it.
        while not self.try_acquire():
            await asyncio.sleep(LOCK_POLL_INTERVAL)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    async def __aenter__(self) -> BundleLock:
        await self.acquire()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def lru_victims(bundles: list[BaseImageBundle], limit: int, keep: str | None = None) -> list[str]:
    """Bundle ids to evict, oldest ``last_accessed_at`` first, so at most ``limit`` remain."""
    excess = len(bundles) - limit
    if excess <= 0:
        return []
    candidates = sorted(
        (b for b in bundles if b.bundle_id != keep), key=lambda b: (b.last_accessed_at, b.bundle_id)
    )
    return [b.bundle_id for b in candidates[:excess]]


class BundleCache:
    """Blocking filesystem operations on the cache; callers hold the bundle's lock to mutate."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def bundle_dir(self, bundle_id: str) -> Path:
        try:
            validate_bundle_id(bundle_id)
        except ValueError as exc:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, str(exc), details={"bundle_id": bundle_id}
            ) from exc
        return self.cache_dir / bundle_id

    def lock(self, bundle_id: str) -> BundleLock:
        self.bundle_dir(bundle_id)  # validates the id before it becomes a file name
        return BundleLock(self.cache_dir / ".locks" / f"{bundle_id}.lock")

    def read(self, bundle_id: str) -> BaseImageBundle | None:
        """The cached bundle's manifest, or ``None`` if absent or unreadable."""
        path = self.bundle_dir(bundle_id) / MANIFEST_FILE_NAME
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        try:
            bundle = parse_bundle_manifest(raw, origin=str(path))
        except SmartVMError as exc:
            log.debug("ignoring unreadable bundle manifest %s: %s", path, exc)
            return None
        return bundle if bundle.bundle_id == bundle_id else None

    def write(self, bundle: BaseImageBundle) -> None:
        directory = self.bundle_dir(bundle.bundle_id)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / MANIFEST_FILE_NAME
        temp = directory / f".{MANIFEST_FILE_NAME}.{secrets.token_hex(6)}.part"
        try:
            with temp.open("x", encoding="utf-8") as handle:
                handle.write(bundle.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def list(self) -> list[BaseImageBundle]:
        """Every readable bundle, most recently used first."""
        try:
            entries = sorted(self.cache_dir.iterdir())
        except FileNotFoundError:
            return []
        bundles = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                bundle = self.read(entry.name)
            except SmartVMError:
                continue  # a directory name that is not a valid bundle id is not ours
            if bundle is not None:
                bundles.append(bundle)
        bundles.sort(key=lambda b: (b.last_accessed_at, b.bundle_id), reverse=True)
        return bundles

    def remove_strays(self, bundle_id: str, keep: set[str]) -> None:
        """Delete files in the bundle dir not named in ``keep`` (old artifacts, crashed temp files)."""
        directory = self.bundle_dir(bundle_id)
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()

    def delete(self, bundle_id: str) -> bool:
        directory = self.bundle_dir(bundle_id)
        trash = self.cache_dir / f".trash-{bundle_id}-{secrets.token_hex(4)}"
        try:
            directory.rename(trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True
