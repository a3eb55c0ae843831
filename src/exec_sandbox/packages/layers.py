"""L2 cache: qcow2 layers with packages installed, keyed by (base image, interpreter, exact lock).

A layer is a qcow2 overlay whose backing file is a language's base rootfs, written once by a
builder VM (:mod:`exec_sandbox.vm.layer_build`) and then only read: every sandbox that asks for
the same packages boots from its own overlay backed by the layer, and L1 memory snapshots are
taken on top of it (the layer's path and sha256 are part of their key). Layout of ``cache_dir``::

    <key>/layer.qcow2        the layer (backing file: the base image's rootfs.qcow2)
    <key>/layer.json         stamp: key inputs, the lock, sha256 + size of layer.qcow2
    .locks/<key>.lock        exclusive while a process builds, discards or prunes <key>
    .tmp-<key>-<rand>/       a layer being built, with its builder's owner record (renamed to
                             <key>/ when complete; smartvm.leftovers reaps those of dead builders)
    .trash-<key>-<rand>/     an entry being deleted

Guarantees: an entry appears only complete (built in a temp dir, published with one rename); the
layer is checked against its stamp's sha256 before its first use in this process and whenever its
size/inode/mtime changed - a mismatch discards the entry and the caller rebuilds it; one builder
per key across processes (``fcntl`` locks; the others wait and then use its entry); at most
``max_entries`` entries and ``max_bytes`` bytes, least recently used go first. ``cache_dir`` and
every directory in it are ``0700``, every file ``0600`` (:mod:`smartvm.hostfs`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from exec_sandbox.errors import SandboxPermanentError
from exec_sandbox.packages.lock import PackageLock
from smartvm.cleanup import shielded
from smartvm.filelock import FileLock
from smartvm.hostfs import UnsafePathError, atomic_write_file, ensure_private_dir
from smartvm.leftovers import OWNER_FILE, make_owned_dir, reap, remove_owned_dir, trash_owned_dir

__all__ = ["LAYER_FILE", "LayerCache", "LayerCacheStats", "LayerEntry", "LayerKeyInputs"]

logger = logging.getLogger(__name__)

LAYER_FILE = "layer.qcow2"
_STAMP = "layer.json"
_FORMAT = 2  # 2: console scripts in usr/local/bin; bump when what a layer holds, or how it is made, changes
_KEY_RE = re.compile(r"^[0-9a-f]{40}$")
_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{40}-.+")
_POLL_S = 0.05


class LayerKeyInputs(BaseModel):
    """Everything a layer's bytes depend on; :meth:`key` hashes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    language: str
    base_rootfs_sha256: str
    base_recipe_hash: str
    target: str
    lock_digest: str
    layer_format: int = _FORMAT

    def key(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class LayerEntry:
    key: str
    path: Path  # the layer qcow2
    sha256: str
    lock: PackageLock


@dataclass
class LayerCacheStats:
    hits: int = 0
    builds: int = 0
    corrupt_rebuilt: int = 0
    waited_for_other_builder: int = 0
    pruned: int = 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _stat_id(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class LayerCache:
    """The L2 layer cache in ``cache_dir`` (see the module docstring)."""

    def __init__(self, cache_dir: Path, *, max_entries: int = 16, max_bytes: int = 8 << 30) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self.cache_dir = cache_dir.absolute()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stats = LayerCacheStats()
        self._verified: dict[str, tuple[tuple[tuple[int, int, int, int], ...], LayerEntry]] = {}

    def entry_dir(self, key: str) -> Path:
        return self.cache_dir / key

    def entries(self) -> list[str]:
        try:
            return sorted(p.name for p in self.cache_dir.iterdir() if _KEY_RE.match(p.name) and p.is_dir())
        except FileNotFoundError:
            return []

    def _private(self) -> Path:
        try:
            ensure_private_dir(self.cache_dir)
            return ensure_private_dir(self.cache_dir / ".locks")
        except UnsafePathError as exc:
            raise SandboxPermanentError(
                f"the package layer cache is not safe to use: {exc.message}",
                context={"path": str(exc.path), "problem": exc.problem},
            ) from exc

    # ------------------------------------------------------------------ lookup

    def _load(self, key: str) -> LayerEntry | None:
        """The verified entry ``key``; None when absent; a corrupt one is discarded (and None)."""
        entry_dir = self.entry_dir(key)
        layer = entry_dir / LAYER_FILE
        try:
            ident = (_stat_id(layer), _stat_id(entry_dir / _STAMP))
            seen = self._verified.get(key)
            if seen is not None and seen[0] == ident:
                return seen[1]
            stamp = json.loads((entry_dir / _STAMP).read_text())
            entry = LayerEntry(key, layer, stamp["sha256"], PackageLock.model_validate(stamp["lock"]))
            problem = None
            if stamp.get("key") != key or stamp.get("size") != ident[0][2]:
                problem = "its stamp does not describe it"
            elif _sha256(layer) != entry.sha256:
                problem = "its sha256 does not match its stamp"
        except FileNotFoundError:
            if not entry_dir.exists():
                return None
            problem = "a file is missing"
        except (OSError, ValueError, KeyError) as exc:
            problem = f"unreadable stamp ({exc})"
        if problem is not None:
            logger.warning("package layer %s is corrupt (%s): discarded, rebuilding", key, problem)
            self._move_to_trash(key)
            self._verified.pop(key, None)
            self.stats.corrupt_rebuilt += 1
            return None
        self._verified[key] = (ident, entry)
        return entry

    async def get_or_build(
        self,
        inputs: LayerKeyInputs,
        lock: PackageLock,
        build: Callable[[Path], Awaitable[Path]],
    ) -> tuple[LayerEntry, bool]:
        """The layer of ``inputs`` and whether it was a cache hit; on a miss ``build(tmp_dir)`` makes
        ``tmp_dir/layer.qcow2`` and it is published. One builder per key across processes."""
        key = inputs.key()
        locks = await asyncio.to_thread(self._private)
        flock = FileLock(locks / f"{key}.lock")
        at_once = await asyncio.to_thread(flock.try_acquire, shared=False)
        if not at_once:
            await flock.acquire(shared=False)
        try:
            if not at_once:
                self.stats.waited_for_other_builder += 1
            entry = await asyncio.to_thread(self._load, key)
            if entry is not None:
                self.stats.hits += 1
                await asyncio.to_thread(os.utime, self.entry_dir(key))  # last use, for LRU
                return entry, True
            tmp = await asyncio.to_thread(
                make_owned_dir, self.cache_dir, f".tmp-{key}-", kind="package-layer"
            )
            try:
                layer = await build(tmp)
                entry = await asyncio.to_thread(self._publish, key, inputs, lock, tmp, layer)
            finally:
                await shielded(asyncio.to_thread(remove_owned_dir, tmp))
            self.stats.builds += 1
        finally:
            flock.release()
        await asyncio.to_thread(self.prune, keep=key)
        return entry, False

    def _publish(
        self, key: str, inputs: LayerKeyInputs, lock: PackageLock, tmp: Path, layer: Path
    ) -> LayerEntry:
        if layer != tmp / LAYER_FILE:
            raise AssertionError(f"the layer must be built at {tmp / LAYER_FILE}")
        os.chmod(layer, 0o600)
        sha, size = _sha256(layer), layer.stat().st_size
        stamp: dict[str, Any] = {"key": key, "inputs": inputs.model_dump(mode="json"), "sha256": sha,
                                 "size": size, "lock": lock.model_dump(mode="json")}
        atomic_write_file(tmp / _STAMP, json.dumps(stamp, indent=1).encode())
        (tmp / OWNER_FILE).unlink()  # a published entry belongs to the cache
        os.rename(tmp, self.entry_dir(key))
        entry = LayerEntry(key, self.entry_dir(key) / LAYER_FILE, sha, lock)
        self._verified[key] = ((_stat_id(entry.path), _stat_id(entry.path.parent / _STAMP)), entry)
        logger.info("cached package layer %s (%d packages, %d KiB)", key, len(lock.packages), size >> 10)
        return entry

    # ------------------------------------------------------------------ delete

    def _move_to_trash(self, key: str) -> bool:
        return trash_owned_dir(self.entry_dir(key))

    def prune(self, *, keep: str | None = None) -> list[str]:
        """Remove least-recently-used entries beyond ``max_entries``/``max_bytes`` (never ``keep``,
        never one another process holds), and leftovers of dead builders."""
        if not self.cache_dir.is_dir():
            return []
        locks = self._private()
        reap(self.cache_dir, name_pattern=_TMP_RE, min_age=3600.0)
        for leftover in self.cache_dir.iterdir():
            if leftover.name.startswith(".trash-"):
                remove_owned_dir(leftover)
        used: list[tuple[float, int, str]] = []
        for key in self.entries():
            try:
                size = (self.entry_dir(key) / LAYER_FILE).stat().st_size
                used.append((self.entry_dir(key).stat().st_mtime, size, key))
            except FileNotFoundError:
                continue
        used.sort(reverse=True)  # most recent first
        removed, total = [], 0
        for index, (_, size, key) in enumerate(used):
            total += size
            if key == keep or (index < self.max_entries and total <= self.max_bytes):
                continue
            flock = FileLock(locks / f"{key}.lock")
            if not flock.try_acquire(shared=False):
                continue
            try:
                if self._move_to_trash(key):
                    removed.append(key)
                    self._verified.pop(key, None)
                    total -= size
            finally:
                flock.release()
        self.stats.pruned += len(removed)
        return removed
