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
import logging
import os
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from exec_sandbox.errors import SandboxError, SandboxTransientError
from exec_sandbox.images.manifest import BundleManifest
from exec_sandbox.settings import Settings
from exec_sandbox.storage.overlay_pool import OverlayPool
from exec_sandbox.vm.sandbox_vm import BootLogCallback, SandboxVm
from exec_sandbox.vm.snapshot_entries import (
    SNAPSHOT_SUBDIR,
    CorruptEntry,
    FileLock,
    SnapshotKeyInputs,
    accelerator_for,
    build_key_inputs,
    cacheable_reason,
    qemu_version,
    stat_id,
    verify_entry,
    write_manifest,
)
from exec_sandbox.vm.spec import VmOptions
from exec_sandbox.vm_manager import ImageBundle, VmManager
from smartvm.cleanup import AsyncClosing
from smartvm.errors import ErrorCode
from smartvm.hostfs import UnsafePathError, ensure_private_dir
from smartvm.leftovers import OWNER_FILE, make_owned_dir, reap, remove_owned_dir, trash_owned_dir
from smartvm.qemu import UserNetSpec

__all__ = [
    "SnapshotCache",
    "SnapshotCacheState",
    "SnapshotCacheStats",
    "warm_vm",
]

logger = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[0-9a-f]{40}$")
_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{40}-.+")
_UNRECORDED_TMP_MAX_AGE_S = 3600.0  # a writer's dir without a record (older versions): abandoned by then


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


class SnapshotCache(AsyncClosing):
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
            accelerator=accelerator_for(options, self.settings),
            warmup_spare=self.spare,
        )

    async def key_for(self, options: VmOptions) -> str:
        return (await self.key_inputs(options)).key()

    def _bundle_manifest(self, bundle: ImageBundle) -> BundleManifest:
        ident = stat_id(bundle.manifest)
        seen = self._manifests.get(bundle.manifest)
        if seen is not None and seen[0] == ident:
            return seen[1]
        manifest = BundleManifest.model_validate_json(bundle.manifest.read_bytes())
        self._manifests[bundle.manifest] = (ident, manifest)
        return manifest

    def entry_dir(self, key: str) -> Path:
        return self.cache_dir / key

    def _lock(self, key: str, kind: str) -> FileLock:
        return FileLock(self.cache_dir / ".locks" / f"{key}.{kind}")

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
        user_net: UserNetSpec | None = None,
    ) -> tuple[SandboxVm, bool]:
        """A ready, REPL-warm VM for ``options`` and whether it was restored from the cache.

        A miss cold-boots (with the RAM in a shared file) and snapshots the warm guest for the next
        caller; hashing and publishing that snapshot continue in the background after this returns.
        A corrupt entry is discarded and a failed restore falls back to a cold boot: the cache can
        make a VM faster, never make it fail. ``nice``: QEMU's CPU priority (see ``SandboxVm.boot``).
        ``user_net``: this VM's NIC backend (``options.nic``; the snapshot's guest never configured
        its NIC, so a restore only swaps the backend - see :mod:`exec_sandbox.vm.network`).
        """
        if self._state is not SnapshotCacheState.OPEN:
            raise SandboxTransientError(
                "the snapshot cache is closed", context={"cache_dir": str(self.cache_dir)}
            )
        reason = cacheable_reason(options)
        if reason is not None:
            self.stats.uncacheable += 1
            logger.debug("not using the snapshot cache: %s", reason)
            cold = await self._boot_warm(
                options, runtime_dir, vm_id, overlay_pool, on_boot_log, nice, user_net
            )
            return cold, False
        inputs = await self.key_inputs(options)
        key = inputs.key()
        vm = await self._try_restore(key, options, runtime_dir, vm_id, nice, user_net)
        if vm is not None:
            return vm, True
        vm = await self._boot_warm(
            options.model_copy(update={"shared_memory": True}),
            runtime_dir,
            vm_id,
            overlay_pool,
            on_boot_log,
            nice,
            user_net,
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
        user_net: UserNetSpec | None = None,
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
            user_net=user_net,
        )
        try:
            await warm_vm(vm, spare=self.spare)
        except BaseException:
            await vm.close()
            raise
        self.stats.cold_boots += 1
        return vm

    async def _try_restore(
        self, key: str, options: VmOptions, runtime_dir: Path | None, vm_id: str | None, nice: int = 0,
        user_net: UserNetSpec | None = None,
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
                await asyncio.to_thread(verify_entry, entry, key)
            except CorruptEntry as exc:
                corrupt = str(exc)
            except FileNotFoundError:
                return None  # pruned between the check and the lock
            if corrupt is None:
                try:
                    vm = await SandboxVm.restore_from(
                        entry / SNAPSHOT_SUBDIR,
                        settings=self.settings,
                        runtime_dir=runtime_dir,
                        vm_id=vm_id,
                        boot_timeout_s=options.boot_timeout_s,
                        reseed=True,
                        nice=nice,
                        user_net=user_net,
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
            await vm.save_snapshot(tmp / SNAPSHOT_SUBDIR)
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
        self, key: str, inputs: SnapshotKeyInputs, vm_id: str, tmp: Path, writer: FileLock
    ) -> None:
        """Hash the files, write the manifest, then make the entry visible with one rename."""
        try:
            await asyncio.to_thread(write_manifest, tmp, key, inputs, vm_id)
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
        return trash_owned_dir(self.entry_dir(key))

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

