"""``packages=`` for runs and sessions: from a request to an L2 layer a VM boots from.

:class:`PackageLayers` (one per Scheduler) reads the guest's interpreter and platform from the
language image's manifest, resolves the request on the host (or takes the given lock), and finds
the layer of (base image, interpreter, exact lock) in the L2 cache - building it on a miss:
install on the host, pack a read-only ext4 disk, let a builder VM copy it into a qcow2 overlay of
the base image (:mod:`exec_sandbox.vm.layer_build`). Every step runs before the sandbox's own VM
is started, so a bad request costs no VM.

A resolution is remembered for ``resolve_ttl_s`` (the same specs on the same guest reuse the lock
instead of asking the index again; give a lock to pin it for longer). Progress steps (resolving,
downloading N files, installing, cached) go to ``progress`` (``(step, kind, detail)``).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from exec_sandbox.images.manifest import BundleManifest
from exec_sandbox.packages import (
    GuestTarget,
    LayerCache,
    LayerEntry,
    LayerKeyInputs,
    PackageLock,
    PackageRequest,
    ProgressCallback,
    guest_target,
)
from exec_sandbox.packages.npm import GUEST_NODE_MODULES
from exec_sandbox.packages.staging import lock_for, stage_disk
from exec_sandbox.settings import Settings
from exec_sandbox.vm.layer_build import build_layer
from exec_sandbox.vm_manager import VmManager
from smartvm.hostfs import ensure_private_dir

__all__ = ["PackageInstall", "PackageLayers"]


@dataclass(frozen=True)
class PackageInstall:
    """What a VM boots from for one ``packages=`` request, and what it holds."""

    lock: PackageLock
    layer: LayerEntry
    cache_hit: bool  # the L2 layer was already cached (no install, no builder VM)
    env: dict[str, str] = field(default_factory=dict)  # added to the guest's default environment


class PackageLayers:
    """Resolves ``packages=`` requests and keeps their L2 layers (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        vm_manager: VmManager,
        *,
        cache_dir: Path | None = None,
        runtime_dir: Path | None = None,
        progress: ProgressCallback | None = None,
        resolve_ttl_s: float = 600.0,
        fetch_attempts: int = 3,
        max_entries: int = 16,
        max_bytes: int = 8 << 30,
    ) -> None:
        self.settings = settings
        self.vm_manager = vm_manager
        self.cache = LayerCache(cache_dir or settings.cache_dir / "layers", max_entries=max_entries,
                                max_bytes=max_bytes)
        self.runtime_dir = runtime_dir
        self.progress = progress
        self.resolve_ttl_s = resolve_ttl_s
        self.fetch_attempts = fetch_attempts
        self._resolved: dict[tuple[str, tuple[str, ...], str], tuple[float, PackageLock]] = {}
        self._builds: dict[str, asyncio.Lock] = {}

    def report(self, step: str, kind: str, detail: str = "") -> None:
        """Send one progress report to ``progress`` (also used for the VM's first snapshot)."""
        if self.progress is not None:
            self.progress(step, kind, detail)

    async def _target(self, language: str) -> tuple[GuestTarget, BundleManifest]:
        bundle = await self.vm_manager.aget_bundle(language)
        manifest = BundleManifest.model_validate_json(await asyncio.to_thread(bundle.manifest.read_bytes))
        pkgs = [(str(p.get("name")), str(p.get("version"))) for p in manifest.packages]
        return guest_target(manifest.arch, pkgs), manifest

    def _workdir(self) -> Path:
        parent = ensure_private_dir(self.runtime_dir) if self.runtime_dir is not None else None
        return Path(tempfile.mkdtemp(prefix="packages-", dir=parent))

    async def lock(self, language: str, request: PackageRequest) -> PackageLock:
        """The exact lock of ``request`` for the guest of ``language`` (resolving on the host)."""
        target, _ = await self._target(language)
        return await self._lock(language, request, target)

    async def _lock(self, language: str, request: PackageRequest, target: GuestTarget) -> PackageLock:
        memo_key = (language, request.specs, target.label(request.ecosystem))
        seen = self._resolved.get(memo_key)
        if request.lock is None and seen is not None and time.monotonic() - seen[0] < self.resolve_ttl_s:
            return seen[1]
        workdir = await asyncio.to_thread(self._workdir)
        try:
            lock = await lock_for(
                request, target, workdir, progress=self.progress, attempts=self.fetch_attempts
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        if request.lock is None:
            self._resolved[memo_key] = (time.monotonic(), lock)
        return lock

    async def ensure(self, language: str, request: PackageRequest) -> PackageInstall:
        """The L2 layer for ``request`` (built on a miss); raises before any sandbox VM boots."""
        target, manifest = await self._target(language)
        lock = await self._lock(language, request, target)
        inputs = LayerKeyInputs(
            language=language,
            base_rootfs_sha256=manifest.rootfs.sha256,
            base_recipe_hash=manifest.recipe_hash,
            target=target.label(request.ecosystem),
            lock_digest=lock.digest(),
        )
        bundle = await self.vm_manager.aget_bundle(language)

        async def build(tmp: Path) -> Path:
            stage = tmp / "stage"
            stage.mkdir(mode=0o700)
            disk = await stage_disk(lock, target, stage, progress=self.progress, attempts=self.fetch_attempts)
            self.report("installing packages", "start", f"{len(lock.packages)} packages into a layer")
            layer = await build_layer(bundle, disk, tmp, settings=self.settings, runtime_dir=self.runtime_dir)
            await asyncio.to_thread(shutil.rmtree, stage)
            self.report("installing packages", "done", "into a new disk layer")
            return layer

        # One build per key in this process without polling the flock (which also excludes us).
        guard = self._builds.setdefault(inputs.key(), asyncio.Lock())
        async with guard:
            entry, hit = await self.cache.get_or_build(inputs, lock, build)
        if hit:
            self.report("packages", "cached", f"{len(lock.packages)} packages, layer {entry.key[:12]}")
        env = {"NODE_PATH": "/" + GUEST_NODE_MODULES} if lock.ecosystem == "npm" else {}
        return PackageInstall(lock=lock, layer=entry, cache_hit=hit, env=env)
