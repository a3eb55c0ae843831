"""L1 memory-snapshot cache: restore a warm guest in milliseconds instead of cold-booting it.

After the first cold boot of a combination (language, image, kernel, VM options, QEMU version,
accelerator, agent protocol, snapshot format) the ready guest - REPL warm - is snapshotted
(memory, device state and the disk overlay at that moment) into ``cache_dir/<key>/``. Later VMs of
the same combination are restored from it in a fresh QEMU (RAM mapped copy-on-write from the cached
file, so every clone shares it; a private copy of the disk) and their RNG is reseeded with host
entropy before anything else runs (:meth:`SandboxVm.restore_from` does that).

Layout of ``cache_dir``::

    <key>/manifest.json          key inputs + sha256/size of every snapshot file
    <key>/snapshot/...           what SandboxVm.save_snapshot wrote (vmstate, memory, disk.qcow2, ...)
    .locks/<key>.lock            shared by restorers, exclusive for discard/prune
    .locks/<key>.write           exclusive: one writer per key (others skip saving)
    .tmp-<key>-<rand>/           an entry being written, with the writer's owner record (renamed to
                                 <key>/ when complete; smartvm.leftovers reaps those of dead writers)
    .trash-<key>-<rand>/         an entry being deleted

Guarantees: a stale snapshot is never restored (every input that shapes the guest is part of the
key); an entry appears only complete (written in a temp dir, then renamed); every file is checked
against its recorded sha256 before the first use in this process, and again whenever its size,
inode or mtime changed - a mismatch discards the entry (logged) and the caller cold-boots; several
processes share one cache through ``fcntl`` locks. Old entries are pruned least-recently-used.
The cache holds guest memory: ``cache_dir`` and every directory in it are ``0700`` (verified before
use, see :mod:`smartvm.hostfs`) and every file ``0600`` from creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exec_sandbox.errors import SandboxError, SandboxPermanentError, SandboxTransientError
from exec_sandbox.images.manifest import BundleManifest
from exec_sandbox.protocol.agent import PROTOCOL_VERSION
from exec_sandbox.settings import Settings
from exec_sandbox.storage.overlay_pool import OverlayPool
from exec_sandbox.vm.sandbox_vm import SNAPSHOT_FORMAT, BootLogCallback, SandboxVm, VmOptions
from exec_sandbox.vm_manager import ImageBundle, VmManager
from smartvm.errors import ErrorCode
from smartvm.hostfs import UnsafePathError, atomic_write_file, ensure_private_dir
from smartvm.leftovers import OWNER_FILE, make_owned_dir, reap, remove_owned_dir
from smartvm.process import run_tool
from smartvm.qemu.accel import choose_accelerator

__all__ = [
    "CACHE_FORMAT",
    "FileDigest",
    "SnapshotCache",
    "SnapshotCacheState",
    "SnapshotCacheStats",
    "SnapshotKeyInputs",
    "SnapshotManifest",
    "build_key_inputs",
    "cacheable_reason",
    "parse_qemu_version",
    "qemu_version",
    "warm_vm",
]

logger = logging.getLogger(__name__)

# Bump when the entry layout or the meaning of a key input changes.
# 2: TCG guests boot with the host TSC rate (smartvm.qemu.with_host_tsc); older entries tick on the PIT.
CACHE_FORMAT = 2
_HASH_CHUNK = 1 << 20
_SNAPSHOT_SUBDIR = "snapshot"
_KEY_RE = re.compile(r"^[0-9a-f]{40}$")
_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{40}-.+")
_UNRECORDED_TMP_MAX_AGE_S = 3600.0  # a writer's dir without a record (older versions): abandoned by then
# VmOptions fields that do not change the guest (only how long we wait for it).
_NOT_IN_KEY = frozenset({"boot_timeout_s"})


# --------------------------------------------------------------------------- pure parts


class SnapshotKeyInputs(BaseModel):
    """Everything a cached snapshot depends on; :meth:`key` hashes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    language: str
    recipe_hash: str
    rootfs_sha256: str
    kernel_sha256: str
    initrd_sha256: str | None
    kernel_recipe_hash: str
    boot_args: str
    memory_mb: int
    vcpus: int
    options: dict[str, Any]  # the rest of VmOptions (env, kernel args, flavor, ...), as JSON
    qemu_version: str
    accelerator: str
    agent_protocol_version: int
    snapshot_format: int
    cache_format: int
    warmup_spare: bool

    def key(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:40]


def cacheable_reason(options: VmOptions) -> str | None:
    """Why ``options`` must not be served from the cache (None: it may be)."""
    if options.network:
        return "networked guests hold host-side NAT state that a snapshot cannot carry"
    if options.port_forwards:
        return "port forwards bind host ports that a restored clone cannot share"
    return None


def build_key_inputs(
    options: VmOptions,
    manifest: BundleManifest,
    *,
    qemu_version: str,
    accelerator: str,
    warmup_spare: bool,
) -> SnapshotKeyInputs:
    """The key inputs of ``options`` booted from the bundle described by ``manifest``. Pure."""
    dumped = options.model_dump(mode="json", exclude=set(_NOT_IN_KEY))
    rest = {k: v for k, v in dumped.items() if k not in ("language", "memory_mb", "vcpus")}
    return SnapshotKeyInputs(
        language=options.language,
        recipe_hash=manifest.recipe_hash,
        rootfs_sha256=manifest.rootfs.sha256,
        kernel_sha256=manifest.kernel.sha256,
        initrd_sha256=manifest.initrd.sha256 if manifest.initrd else None,
        kernel_recipe_hash=manifest.kernel_recipe_hash,
        boot_args=manifest.boot_args,
        memory_mb=options.memory_mb,
        vcpus=options.vcpus,
        options=rest,
        qemu_version=qemu_version,
        accelerator=accelerator,
        agent_protocol_version=PROTOCOL_VERSION,
        snapshot_format=SNAPSHOT_FORMAT,
        cache_format=CACHE_FORMAT,
        warmup_spare=warmup_spare,
    )


def parse_qemu_version(text: str) -> str:
    """``QEMU emulator version 7.2.22 (Debian ...)`` -> the whole first line (the package build counts)."""
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not first.startswith("QEMU emulator version"):
        raise ValueError(f"not a QEMU --version output: {first!r}")
    return first


class FileDigest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class SnapshotManifest(BaseModel):
    """``<key>/manifest.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_format: int
    key: str
    inputs: SnapshotKeyInputs
    files: dict[str, FileDigest]  # relative to <key>/snapshot
    created_at: float
    source_vm_id: str


# --------------------------------------------------------------------------- host facts

_QEMU_VERSIONS: dict[str, str] = {}


async def qemu_version(binary: str) -> str:
    """First line of ``<binary> --version`` (memoised per binary for this process)."""
    cached = _QEMU_VERSIONS.get(binary)
    if cached is not None:
        return cached
    try:
        result = await run_tool([binary, "--version"])
        version = parse_qemu_version(result.stdout.decode(errors="replace"))
    except (OSError, ValueError) as exc:
        raise SandboxTransientError(
            f"cannot read the QEMU version from {binary!r}: {exc}", context={"binary": binary}
        ) from exc
    _QEMU_VERSIONS[binary] = version
    return version


@functools.cache
def _probed_accelerator() -> str:
    return choose_accelerator(None).accel


def _accelerator_for(options: VmOptions, settings: Settings) -> str:
    # Mirrors SandboxVm: an explicit option, then Settings.force_emulation, then smartvm's probe.
    if options.accel is not None:
        return options.accel
    if settings.force_emulation:
        return "tcg"
    return _probed_accelerator()


# --------------------------------------------------------------------------- file helpers


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stat_id(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# (device, inode, size, mtime) -> sha256: a file this process already hashed and nobody changed since.
# Keyed by inode, not path, so an entry hashed while being written is not re-hashed after its rename.
_VERIFIED: dict[tuple[int, int, int, int], str] = {}


def _digest_cached(path: Path) -> str:
    ident = _stat_id(path)
    seen = _VERIFIED.get(ident)
    if seen is not None:
        return seen
    digest = _sha256_file(path)
    if _stat_id(path) == ident:  # not modified while hashing
        _VERIFIED[ident] = digest
    return digest


class _Corrupt(Exception):
    """An entry failed verification (the message says how)."""


def _list_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _verify_entry(entry: Path, key: str) -> SnapshotManifest:
    try:
        manifest = SnapshotManifest.model_validate_json((entry / "manifest.json").read_bytes())
    except (OSError, ValidationError, ValueError) as exc:
        raise _Corrupt(f"manifest unreadable: {exc}") from exc
    if manifest.cache_format != CACHE_FORMAT or manifest.key != key or manifest.inputs.key() != key:
        raise _Corrupt("manifest does not belong to this key")
    root = entry / _SNAPSHOT_SUBDIR
    present = _list_files(root) if root.is_dir() else []
    if present != sorted(manifest.files):
        raise _Corrupt(f"files {present} differ from the manifest's {sorted(manifest.files)}")
    for rel, want in manifest.files.items():
        path = root / rel
        if path.is_symlink():
            raise _Corrupt(f"{rel} is a symlink")
        size = path.stat().st_size
        if size != want.size:
            raise _Corrupt(f"{rel} has {size} bytes, the manifest says {want.size}")
        got = _digest_cached(path)
        if got != want.sha256:
            raise _Corrupt(f"{rel} has sha256 {got}, the manifest says {want.sha256}")
    # The disk copy is an overlay whose backing file is the image's base: without it, no restore.
    try:
        base = Path(json.loads((root / "sandbox.json").read_text())["base_image"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Corrupt(f"sandbox.json unreadable: {exc}") from exc
    if not base.is_file():
        raise _Corrupt(f"its base image {base} no longer exists")
    return manifest


def _write_manifest(tmp_entry: Path, key: str, inputs: SnapshotKeyInputs, vm_id: str) -> None:
    root = tmp_entry / _SNAPSHOT_SUBDIR
    files = {}
    for rel in _list_files(root):
        path = root / rel
        files[rel] = FileDigest(sha256=_digest_cached(path), size=path.stat().st_size)
    manifest = SnapshotManifest(
        cache_format=CACHE_FORMAT,
        key=key,
        inputs=inputs,
        files=files,
        created_at=time.time(),
        source_vm_id=vm_id,
    )
    atomic_write_file(tmp_entry / "manifest.json", manifest.model_dump_json(indent=1).encode(), fsync=True)


class _FileLock:
    """An ``fcntl.flock`` on one lock file, taken without blocking the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self, *, shared: bool) -> bool:
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held")
        try:
            ensure_private_dir(self.path.parent)
        except UnsafePathError as exc:
            raise SandboxPermanentError(
                f"the snapshot cache is not safe to use: {exc.message}",
                context={"path": str(exc.path), "problem": exc.problem},
            ) from exc
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        return True

    async def acquire(self, *, shared: bool, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.try_acquire(shared=shared):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the description drops the flock


# --------------------------------------------------------------------------- warm-up


async def warm_vm(vm: SandboxVm, *, spare: bool = True) -> None:
    """Start the VM's language REPL (and a spare one-shot interpreter) so the first exec is fast."""
    language = vm.language
    restored = vm.reseed_result
    if (
        language == "python"
        and restored is not None
        and language in restored.repls_reseeded
        and (not spare or language in restored.spares_reseeded)
    ):
        # Restored with both already running (Python reseeds in place; JavaScript interpreters
        # restart after a reseed, so they are waited for below): a round trip saved, and ~40 ms
        # of guest CPU for translating the warm-up path afresh.
        return
    result = await vm.agent.warmup([language], session=True, spare=spare and language != "raw")
    if result.errors:
        raise SandboxTransientError(
            f"warming the {language} interpreter of VM {vm.vm_id} failed: {result.errors}",
            context={"vm_id": vm.vm_id, "errors": dict(result.errors)},
        )


# --------------------------------------------------------------------------- the cache


class SnapshotCacheState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass
class SnapshotCacheStats:
    restores: int = 0
    cold_boots: int = 0
    saves: int = 0
    save_skipped: int = 0  # another writer had the key, or the entry appeared meanwhile
    corrupt_discarded: int = 0
    restore_failures: int = 0
    uncacheable: int = 0
    pruned: int = 0


class SnapshotCache:
    """Restores warm guests from cached memory snapshots; cold-boots (and caches) on a miss.

    ``cache_dir`` defaults to ``settings.cache_dir / "snapshots"``. ``max_entries``: entries kept
    after each save (least recently used go first). ``spare``: also warm a spare one-shot
    interpreter before snapshotting (what makes a restored ``run()`` skip interpreter start-up).
    """

    def __init__(
        self,
        cache_dir: Path | None = None,
        *,
        settings: Settings | None = None,
        vm_manager: VmManager | None = None,
        max_entries: int = 8,
        spare: bool = True,
        lock_timeout_s: float = 10.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.settings = settings or (vm_manager.settings if vm_manager is not None else Settings())
        self.vm_manager = vm_manager or VmManager(self.settings)
        self.cache_dir = (cache_dir or self.settings.cache_dir / "snapshots").absolute()
        self.max_entries = max_entries
        self.spare = spare
        self.lock_timeout_s = lock_timeout_s
        self.stats = SnapshotCacheStats()
        self._state = SnapshotCacheState.OPEN
        self._saves: set[asyncio.Task[None]] = set()
        self._manifests: dict[Path, tuple[tuple[int, int, int, int], BundleManifest]] = {}

    @property
    def state(self) -> SnapshotCacheState:
        return self._state

    def __repr__(self) -> str:
        return f"SnapshotCache({str(self.cache_dir)!r}, state={self._state.value!r})"

    # ------------------------------------------------------------------ keys

    async def key_inputs(self, options: VmOptions) -> SnapshotKeyInputs:
        bundle = await self.vm_manager.aget_bundle(options.language, kernel_flavor=options.kernel_flavor)
        manifest = await asyncio.to_thread(self._bundle_manifest, bundle)
        return build_key_inputs(
            options,
            manifest,
            qemu_version=await qemu_version(self.settings.qemu_system_binary),
            accelerator=_accelerator_for(options, self.settings),
            warmup_spare=self.spare,
        )

    async def key_for(self, options: VmOptions) -> str:
        return (await self.key_inputs(options)).key()

    def _bundle_manifest(self, bundle: ImageBundle) -> BundleManifest:
        ident = _stat_id(bundle.manifest)
        seen = self._manifests.get(bundle.manifest)
        if seen is not None and seen[0] == ident:
            return seen[1]
        manifest = BundleManifest.model_validate_json(bundle.manifest.read_bytes())
        self._manifests[bundle.manifest] = (ident, manifest)
        return manifest

    def entry_dir(self, key: str) -> Path:
        return self.cache_dir / key

    def _lock(self, key: str, kind: str) -> _FileLock:
        return _FileLock(self.cache_dir / ".locks" / f"{key}.{kind}")

    def entries(self) -> list[str]:
        """Keys of the complete entries currently in the cache directory."""
        try:
            return sorted(p.name for p in self.cache_dir.iterdir() if _KEY_RE.match(p.name) and p.is_dir())
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------ restore or boot

    async def restore_or_boot(
        self,
        options: VmOptions,
        *,
        runtime_dir: Path | None = None,
        vm_id: str | None = None,
        overlay_pool: OverlayPool | None = None,
        on_boot_log: BootLogCallback | None = None,
        nice: int = 0,
    ) -> tuple[SandboxVm, bool]:
        """A ready, REPL-warm VM for ``options`` and whether it was restored from the cache.

        A miss cold-boots (with the RAM in a shared file) and snapshots the warm guest for the next
        caller; hashing and publishing that snapshot continue in the background after this returns.
        A corrupt entry is discarded and a failed restore falls back to a cold boot: the cache can
        make a VM faster, never make it fail. ``nice``: QEMU's CPU priority (see ``SandboxVm.boot``).
        """
        if self._state is not SnapshotCacheState.OPEN:
            raise SandboxTransientError(
                "the snapshot cache is closed", context={"cache_dir": str(self.cache_dir)}
            )
        reason = cacheable_reason(options)
        if reason is not None:
            self.stats.uncacheable += 1
            logger.debug("not using the snapshot cache: %s", reason)
            return await self._boot_warm(options, runtime_dir, vm_id, overlay_pool, on_boot_log, nice), False
        inputs = await self.key_inputs(options)
        key = inputs.key()
        vm = await self._try_restore(key, options, runtime_dir, vm_id, nice)
        if vm is not None:
            return vm, True
        vm = await self._boot_warm(
            options.model_copy(update={"shared_memory": True}),
            runtime_dir,
            vm_id,
            overlay_pool,
            on_boot_log,
            nice,
        )
        try:
            await self._save(key, inputs, vm)
        except asyncio.CancelledError:
            await vm.close()
            raise
        except Exception:  # the VM is fine; only the cache could not take it
            logger.warning("could not snapshot VM %s into the cache", vm.vm_id, exc_info=True)
        return vm, False

    async def _boot_warm(
        self,
        options: VmOptions,
        runtime_dir: Path | None,
        vm_id: str | None,
        overlay_pool: OverlayPool | None,
        on_boot_log: BootLogCallback | None,
        nice: int = 0,
    ) -> SandboxVm:
        vm = await SandboxVm.boot(
            options,
            settings=self.settings,
            vm_manager=self.vm_manager,
            overlay_pool=overlay_pool,
            runtime_dir=runtime_dir,
            on_boot_log=on_boot_log,
            vm_id=vm_id,
            nice=nice,
        )
        try:
            await warm_vm(vm, spare=self.spare)
        except BaseException:
            await vm.close()
            raise
        self.stats.cold_boots += 1
        return vm

    async def _try_restore(
        self, key: str, options: VmOptions, runtime_dir: Path | None, vm_id: str | None, nice: int = 0
    ) -> SandboxVm | None:
        entry = self.entry_dir(key)
        if not await asyncio.to_thread(entry.is_dir):
            return None
        lock = self._lock(key, "lock")
        if not await lock.acquire(shared=True, timeout=self.lock_timeout_s):
            logger.warning("snapshot %s is locked for deletion; cold-booting", key)
            return None
        corrupt: str | None = None
        try:
            try:
                await asyncio.to_thread(_verify_entry, entry, key)
            except _Corrupt as exc:
                corrupt = str(exc)
            except FileNotFoundError:
                return None  # pruned between the check and the lock
            if corrupt is None:
                try:
                    vm = await SandboxVm.restore_from(
                        entry / _SNAPSHOT_SUBDIR,
                        settings=self.settings,
                        runtime_dir=runtime_dir,
                        vm_id=vm_id,
                        boot_timeout_s=options.boot_timeout_s,
                        reseed=True,
                        nice=nice,
                    )
                except SandboxError as exc:
                    self.stats.restore_failures += 1
                    logger.warning("restore from snapshot %s failed (%s); cold-booting", key, exc.message)
                    if exc.context.get("smartvm_code") == ErrorCode.SNAPSHOT_FAILED:
                        corrupt = f"QEMU could not load it: {exc.message}"
                else:
                    self.stats.restores += 1
                    with contextlib.suppress(OSError):
                        os.utime(entry)  # last use, for LRU pruning
                    return vm
        finally:
            lock.release()
        if corrupt is not None:
            logger.warning("snapshot %s is corrupt (%s): discarded, cold-booting instead", key, corrupt)
            if await self.discard(key):
                self.stats.corrupt_discarded += 1
        return None

    # ------------------------------------------------------------------ save

    async def _save(self, key: str, inputs: SnapshotKeyInputs, vm: SandboxVm) -> None:
        if await asyncio.to_thread(self.entry_dir(key).is_dir):
            self.stats.save_skipped += 1
            return
        writer = self._lock(key, "write")
        if not await asyncio.to_thread(writer.try_acquire, shared=False):
            self.stats.save_skipped += 1  # another process is writing this key right now
            return
        tmp: Path | None = None
        handed_off = False
        try:
            if await asyncio.to_thread(self.entry_dir(key).is_dir):
                self.stats.save_skipped += 1
                return
            tmp = await asyncio.to_thread(self._new_tmp_entry, key)
            # The guest is paused only while QEMU saves and the RAM file and overlay are copied.
            await vm.save_snapshot(tmp / _SNAPSHOT_SUBDIR)
            task = asyncio.get_running_loop().create_task(
                self._publish(key, inputs, vm.vm_id, tmp, writer), name=f"snapshot-publish-{key[:8]}"
            )
            self._saves.add(task)
            task.add_done_callback(self._saves.discard)
            handed_off = True
        finally:
            if not handed_off:
                if tmp is not None:
                    await asyncio.to_thread(remove_owned_dir, tmp)
                writer.release()

    def _new_tmp_entry(self, key: str) -> Path:
        ensure_private_dir(self.cache_dir)
        return make_owned_dir(self.cache_dir, f".tmp-{key}-", kind="snapshot-write")

    async def _publish(
        self, key: str, inputs: SnapshotKeyInputs, vm_id: str, tmp: Path, writer: _FileLock
    ) -> None:
        """Hash the files, write the manifest, then make the entry visible with one rename."""
        try:
            await asyncio.to_thread(_write_manifest, tmp, key, inputs, vm_id)
            await asyncio.to_thread((tmp / OWNER_FILE).unlink)  # a published entry belongs to the cache
            await asyncio.to_thread(os.rename, tmp, self.entry_dir(key))
            self.stats.saves += 1
            logger.info("cached snapshot %s (%s, %d MiB)", key, inputs.language, inputs.memory_mb)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                self.stats.save_skipped += 1  # another writer published it first
                return
            logger.warning("could not publish snapshot %s", key, exc_info=True)
        finally:
            await asyncio.to_thread(remove_owned_dir, tmp)
            writer.release()
        try:
            await self.prune()
        except OSError:
            logger.warning("pruning the snapshot cache %s failed", self.cache_dir, exc_info=True)

    async def wait_saved(self) -> None:
        """Wait until snapshots being published in the background are done (tests, benchmarks)."""
        while self._saves:
            await asyncio.wait(set(self._saves))

    # ------------------------------------------------------------------ delete

    async def discard(self, key: str) -> bool:
        """Delete entry ``key`` once no process is restoring from it. False if it stayed busy."""
        lock = self._lock(key, "lock")
        if not await lock.acquire(shared=False, timeout=self.lock_timeout_s):
            return False
        try:
            return await asyncio.to_thread(self._move_to_trash, key)
        finally:
            lock.release()

    def _move_to_trash(self, key: str) -> bool:
        trash = self.cache_dir / f".trash-{key}-{secrets.token_hex(4)}"
        try:
            os.rename(self.entry_dir(key), trash)
        except FileNotFoundError:
            return False
        remove_owned_dir(trash)
        return True

    async def prune(self, *, max_entries: int | None = None, max_age_s: float | None = None) -> list[str]:
        """Remove least-recently-used entries beyond ``max_entries`` (default: the constructor's),
        entries unused for ``max_age_s``, and leftovers of dead writers. Busy entries are skipped."""
        keep = self.max_entries if max_entries is None else max_entries
        victims = await asyncio.to_thread(self._prune_candidates, keep, max_age_s)
        removed = []
        for key in victims:
            lock = self._lock(key, "lock")
            if not lock.try_acquire(shared=False):
                continue
            try:
                if await asyncio.to_thread(self._move_to_trash, key):
                    removed.append(key)
            finally:
                lock.release()
        self.stats.pruned += len(removed)
        return removed

    def _prune_candidates(self, keep: int, max_age_s: float | None) -> list[str]:
        if not self.cache_dir.is_dir():
            return []
        try:
            ensure_private_dir(self.cache_dir)
        except UnsafePathError as exc:
            logger.warning("not pruning the snapshot cache: %s", exc.message)
            return []
        # Entries being written by dead writers (their owner record says so; smartvm.leftovers).
        reap(self.cache_dir, name_pattern=_TMP_RE, min_age=_UNRECORDED_TMP_MAX_AGE_S)
        for leftover in self.cache_dir.iterdir():
            if leftover.name.startswith(".trash-"):
                remove_owned_dir(leftover)
        used: list[tuple[float, str]] = []
        for key in self.entries():
            with contextlib.suppress(FileNotFoundError):
                used.append((self.entry_dir(key).stat().st_mtime, key))
        used.sort(reverse=True)
        victims = [key for _, key in used[keep:]]
        if max_age_s is not None:
            cutoff = time.time() - max_age_s
            victims += [key for mtime, key in used[:keep] if mtime < cutoff]
        return victims

    # ------------------------------------------------------------------ close

    async def aclose(self) -> None:
        """Stop accepting calls and finish publishing snapshots in flight. Idempotent."""
        self._state = SnapshotCacheState.CLOSED
        await self.wait_saved()

    async def __aenter__(self) -> SnapshotCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
