"""Where a Scheduler's VMs come from and where they go back: :class:`VmProvisioner`.

:class:`~exec_sandbox.sandbox.scheduler.Scheduler` is a ``VmProvisioner``: this base holds the
state every VM path needs (admission, overlay pool, snapshot cache, warm pools, cgroups) and the
one door in (``_provision``) and out (``_retire``); the Scheduler adds the public API and its
lifecycle on top.

Speed (issue 5)
    :meth:`VmProvisioner._provision` is the one place a ready VM comes from, :meth:`VmProvisioner._retire`
    the one place it goes back. A VM comes, in this order, from:

    1. the warm pool (``config.warm_pool_size`` > 0): ready, REPL-warm VMs per language, kept by a
       :class:`~exec_sandbox.sandbox.warm_pool.WarmPool` per language started on first use of the language
       (or by :meth:`Scheduler.prewarm`). Checkout is O(1) (plus one agent ping as health check);
       only runs/sessions with the default memory size are served. Refills run in the background one
       VM at a time and take capacity only through ``AdmissionController.try_acquire`` (never while
       a foreground call is queued); idle pool VMs are given back when foreground calls queue.
       ``ExecutionResult.warm_pool_hit`` says so; ``timing.boot_ms`` is 0 for a hit.
    2. the L1 memory-snapshot cache (``config.enable_memory_snapshots``, default on):
       :meth:`SnapshotCache.restore_or_boot` restores a warm guest of the same (language, image,
       kernel, memory, vCPUs, QEMU, accelerator, ...) combination in a fresh QEMU, reseeding its RNG
       before any user code runs; the first cold boot of a combination saves that snapshot.
       ``ExecutionResult.restored_from_snapshot`` says so. The cache lives in
       ``settings.cache_dir / "snapshots"`` (or ``snapshot_dir``), shared by processes via flock.
    3. a cold boot (snapshots disabled).

    A networked run or session (a :class:`~exec_sandbox.sandbox.network.NetworkPlan`) never takes a
    pooled VM: its own egress gateway starts first, then the VM boots (or is restored from an L1
    snapshot of a guest with an unconfigured NIC) with a restricted user-mode NIC that leads only to
    that gateway, and ``net_config`` brings the NIC up (:mod:`exec_sandbox.vm.network`). The gateway
    closes with the VM, on every path.

    A restored or pooled VM does not boot, so ``on_boot_log`` gets one ``[sandbox] ...`` line saying
    where the VM came from instead of console lines.

    :meth:`Session.fork` clones a session's VM (memory and disk) into a new, independent session
    (:func:`~exec_sandbox.vm.fork.fork_vm` under ``Session.exclusive()``); the clone reserves its own
    admission capacity first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox.callbacks import call_safely
from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import (
    SandboxError,
    SandboxTransientError,
    VmCapacityError,
)
from exec_sandbox.host.capacity import find_cgroup2_mount
from exec_sandbox.host.cgroups import CgroupManager, VmCgroup
from exec_sandbox.models import Language
from exec_sandbox.sandbox.admission import AdmissionController
from exec_sandbox.sandbox.foreground import ForegroundActivity
from exec_sandbox.sandbox.grants import Grant
from exec_sandbox.sandbox.lifecycle_errors import SchedulerClosedError
from exec_sandbox.sandbox.network import NetworkPlan, plan_network, start_gateway
from exec_sandbox.sandbox.packages import PackageInstall, PackageLayers
from exec_sandbox.sandbox.warm_pool import WarmPool
from exec_sandbox.settings import Settings
from exec_sandbox.storage.overlay_pool import OverlayPool
from exec_sandbox.validation import validate_language
from exec_sandbox.vm.fork import fork_vm
from exec_sandbox.vm.network import attach_egress, build_egress_user_net, concrete_forwards, find_connector
from exec_sandbox.vm.sandbox_vm import BootLogCallback, SandboxVm
from exec_sandbox.vm.snapshots import SnapshotCache, warm_vm
from exec_sandbox.vm.spec import VmOptions, read_snapshot_dir
from exec_sandbox.vm_manager import VmManager

if TYPE_CHECKING:
    from exec_sandbox.egress import EgressGateway
    from exec_sandbox.models import PortForward
    from smartvm.qemu import UserNetSpec

__all__ = ["BACKGROUND_NICE", "SchedulerState", "VmLease", "VmProvisioner"]

logger = logging.getLogger(__name__)

_BOOT_ATTEMPTS = 2
# Nice value of VMs the warm pool makes in the background (set back to 0 at checkout).
BACKGROUND_NICE = 10
_BOOT_TIMEOUT_S = 90.0
# QEMU's threads (vCPUs, RCU, I/O workers); far below what a runaway would need, far above normal.
_QEMU_PIDS_MAX = 512


class SchedulerState(StrEnum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class VmLease:
    """A ready VM handed to one run or session, with where it came from and what it cost."""

    vm: SandboxVm
    grant: Grant
    boot_attempts: int = 1
    cgroup: VmCgroup | None = None
    warm_pool_hit: bool = False
    restored_from_snapshot: bool = False
    gateway: EgressGateway | None = None  # closes with the VM
    forwards: tuple[PortForward, ...] = ()  # port forwards, with the host ports really used
    net: NetworkPlan | None = None  # what a fork of it gets again (its own gateway and forwards)


class VmProvisioner:
    """VM supply of a :class:`~exec_sandbox.sandbox.scheduler.Scheduler` (which sets these fields)."""

    config: SchedulerConfig
    settings: Settings
    _state: SchedulerState
    _runtime_dir: Path | None
    _admission: AdmissionController | None
    _pool: OverlayPool | None
    _vm_manager: VmManager
    _image_lock: asyncio.Lock
    _images: dict[Language, Path]
    _can_renice: bool
    _base_nice: int
    _foreground: ForegroundActivity
    _cgroups: CgroupManager | None
    _snapshots: SnapshotCache | None
    packages: PackageLayers
    _warm_pools: dict[Language, WarmPool]
    _retiring: set[asyncio.Task[None]]

    @property
    def admission(self) -> AdmissionController:
        if self._admission is None:
            raise self._closed_error("use the admission controller of")
        return self._admission

    async def _open_cgroups(self) -> CgroupManager | None:
        """Per-VM cgroup v2 limits (CPU, pids, memory) where the host delegates those controllers."""
        mount = await asyncio.to_thread(find_cgroup2_mount)
        if mount is None:
            logger.info("per-VM cgroup limits unavailable here: no cgroup v2 hierarchy")
            return None
        # A parent of our own: sharing one with other processes would race on its removal.
        manager = CgroupManager(mount / f"exec-sandbox-{os.getpid()}-{secrets.token_hex(3)}")
        support = await asyncio.to_thread(manager.open)
        if support.usable and support.controllers & {"cpu", "pids", "memory"}:
            logger.info("per-VM cgroup limits: %s", ", ".join(sorted(support.controllers)))
            return manager
        logger.info("per-VM cgroup limits unavailable here: %s", support.reason or "no controllers")
        await manager.aclose()
        return None

    def _attach_cgroup(self, vm: SandboxVm, memory_mb: int) -> VmCgroup | None:
        """Put the VM's QEMU process into its own cgroup. Best effort: the guest's RAM is bounded by
        QEMU's -m and its processes by the guest kernel either way; this bounds QEMU itself."""
        if self._cgroups is None or vm.machine.pid is None:
            return None
        cgroup: VmCgroup | None = None
        try:
            cgroup = self._cgroups.create(
                f"vm-{vm.vm_id}",
                # Guest RAM + QEMU's own overhead, with slack: the TCG cache and I/O buffers vary.
                memory_max_bytes=(memory_mb + 2 * self.config.vm_overhead_mb + 64) * 1024 * 1024,
                pids_max=_QEMU_PIDS_MAX,
                cpu_max=float(self.config.default_vcpus),
            )
            cgroup.add_pid(vm.machine.pid)
            return cgroup
        except SandboxError as exc:
            logger.warning("VM %s runs without its cgroup: %s", vm.vm_id, exc.message)
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    cgroup.path.rmdir()
            return None

    def _closed_error(self, action: str) -> SchedulerClosedError:
        hint = " (use `async with Scheduler()` or await start())" if self._state is SchedulerState.NEW else ""
        return SchedulerClosedError(
            f"cannot {action} a Scheduler in state {self._state.value!r}{hint}",
            context={"state": self._state.value, "reason": "scheduler_closed"},
        )

    def _require_running(self, action: str) -> None:
        if self._state is not SchedulerState.RUNNING:
            raise self._closed_error(action)

    async def prewarm(
        self,
        languages: Iterable[Language | str] = ("python",),
        *,
        wait: bool = True,
        timeout_seconds: float | None = None,
    ) -> None:
        """Build/find the images of ``languages`` and start their warm pools (and, with snapshots on,
        fill the snapshot cache with the first cold boot). ``wait``: return only when every pool
        holds ``config.warm_pool_size`` VMs (or ``timeout_seconds`` passed: ``TimeoutError``)."""
        self._require_running("prewarm")
        langs = [validate_language(lang) for lang in languages]
        for lang in langs:
            await self._ensure_image(lang)
        if not wait:
            return
        async with asyncio.timeout(timeout_seconds):
            for lang in langs:
                pool = self._warm_pools.get(lang)
                while pool is not None and pool.idle_count(lang) < pool.size_per_language:
                    self._require_running("prewarm")
                    await asyncio.sleep(0.02)

    async def _ensure_image(self, language: Language) -> Path:
        """Find (building on first use) the language's image, pool its overlays, start its warm pool."""
        known = self._images.get(language)
        if known is not None:
            return known
        async with self._image_lock:
            if language not in self._images:
                bundle = await self._vm_manager.aget_bundle(language)
                base = bundle.rootfs.absolute()
                if self._pool is not None:
                    await self._pool.start([base])  # registers the base with the running pool
                self._images[language] = base
                await self._start_warm_pool(language)
            return self._images[language]

    async def _start_warm_pool(self, language: Language) -> None:
        if self.config.warm_pool_size == 0 or language in self._warm_pools:
            return
        if plan_network(self.config) is not None:  # pooled VMs have no NIC: no default call could use one
            logger.info("no warm pool: this Scheduler's sandboxes are networked (L1 snapshots serve them)")
            return
        if self._state is not SchedulerState.RUNNING:
            return
        pool = WarmPool(
            self._pooled_vm,
            self.config.warm_pool_size,
            self._admission,
            languages=[language],
            memory_mb=self.config.default_memory_mb,
            vcpus=self.config.default_vcpus,
            refill_concurrency=self.config.warm_pool_refill_concurrency,
            foreground=self._foreground,
        )
        self._warm_pools[language] = pool
        await pool.start()
        logger.info("warm pool for %s: %d ready VM(s) kept", language, self.config.warm_pool_size)

    def _vm_options(
        self, language: Language, memory_mb: int, disk_size_mb: int | None = None,
        install: PackageInstall | None = None,
    ) -> VmOptions:
        return VmOptions(
            language=language,
            memory_mb=memory_mb,
            vcpus=self.config.default_vcpus,
            boot_timeout_s=_BOOT_TIMEOUT_S,
            disk_size_mb=disk_size_mb or self.config.disk_size_mb,
            env=install.env if install is not None else {},
            base_layer=install.layer.path if install is not None else None,
            base_layer_sha256=install.layer.sha256 if install is not None else None,
        )

    async def _provision(
        self, language: Language, memory_mb: int, on_boot_log: BootLogCallback | None,
        disk_size_mb: int | None = None, net: NetworkPlan | None = None,
        install: PackageInstall | None = None,
    ) -> VmLease:
        """A ready VM with the capacity it holds: from the warm pool, else a snapshot restore, else a
        cold boot (see the module docstring). ``install``: boot from its L2 package layer (never
        from the warm pool, whose VMs have no packages; L1 snapshots of the layer are used)."""
        pool = self._warm_pools.get(language) if install is None else None
        pool_disk = disk_size_mb in (None, self.config.disk_size_mb)  # pooled VMs have the config's
        if net is not None:
            return await self._provision_networked(
                language, memory_mb, on_boot_log, disk_size_mb, net, install)
        if pool is not None and memory_mb == pool.memory_mb and pool_disk:
            pooled = await pool.checkout(language)
            if pooled is not None:
                assert pooled.grant is not None  # the pools are made with this admission controller
                if self._can_renice:
                    pooled.vm.set_nice(self._base_nice)  # it serves a caller now: our own priority
                await self._note_no_boot(on_boot_log, "a ready VM from the warm pool")
                return VmLease(
                    vm=pooled.vm,
                    grant=pooled.grant,
                    cgroup=self._attach_cgroup(pooled.vm, memory_mb),
                    warm_pool_hit=True,
                    restored_from_snapshot=pooled.vm.timing.restored,
                )
        grant = await self.admission.acquire(memory_mb, self.config.default_vcpus)
        # A layer just built has no memory snapshot yet: this boot makes it (shown as a step).
        snapshotting = install is not None and not install.cache_hit and self._snapshots is not None
        if snapshotting:
            self.packages.report("snapshotting", "start", "booting from the new package layer")
        try:
            options = self._vm_options(language, memory_mb, disk_size_mb, install)
            vm, attempts = await self._boot(options, on_boot_log)
        except BaseException:
            grant.release()
            raise
        if snapshotting:
            self.packages.report("snapshotting", "done", "the next run with these packages restores")
        if vm.timing.restored:
            await self._note_no_boot(on_boot_log, "restored from a memory snapshot")
        return VmLease(
            vm=vm,
            grant=grant,
            boot_attempts=attempts,
            cgroup=self._attach_cgroup(vm, memory_mb),
            restored_from_snapshot=vm.timing.restored,
        )

    async def _provision_networked(
        self, language: Language, memory_mb: int, on_boot_log: BootLogCallback | None,
        disk_size_mb: int | None, net: NetworkPlan, install: PackageInstall | None = None,
    ) -> VmLease:
        """A VM whose NIC leads to its own, already started, egress gateway (and port forwards)."""
        options = self._vm_options(language, memory_mb, disk_size_mb, install)
        options = options.model_copy(update={"nic": True})
        attempts = 0

        async def boot(user_net: UserNetSpec) -> SandboxVm:
            nonlocal attempts
            vm, attempts = await self._boot(options, on_boot_log, user_net)
            return vm

        grant = await self.admission.acquire(memory_mb, self.config.default_vcpus)
        try:
            vm, gateway, forwards = await self._with_network(net, boot)
        except BaseException:
            grant.release()
            raise
        if vm.timing.restored:
            await self._note_no_boot(on_boot_log, "restored from a memory snapshot")
        return VmLease(vm=vm, grant=grant, boot_attempts=attempts, cgroup=self._attach_cgroup(vm, memory_mb),
                       restored_from_snapshot=vm.timing.restored, gateway=gateway, forwards=forwards, net=net)

    async def _with_network(
        self, net: NetworkPlan, make: Callable[[UserNetSpec], Awaitable[SandboxVm]]
    ) -> tuple[SandboxVm, EgressGateway | None, tuple[PortForward, ...]]:
        """Start a gateway for ``net``, make the VM with a NIC leading to it, configure that NIC.
        Nothing is left on failure: the gateway closes with the VM from the moment it exists."""
        gateway = await start_gateway(net, self.config, self._runtime_dir)
        try:
            forwards = concrete_forwards(net.forwards)
            user_net = build_egress_user_net(
                gateway, forwards, socat=find_connector() if gateway is not None else None)
            vm = await make(user_net)
        except BaseException:
            if gateway is not None:
                await gateway.aclose()
            raise
        try:
            await attach_egress(vm, gateway, extra_ca_file=self.config.egress_ca_file)
        except BaseException:
            await vm.close()  # also closes the gateway (attach_egress tied it to the VM first)
            raise
        return vm, gateway, forwards

    async def _provision_fork(self, vm: SandboxVm, memory_mb: int, net: NetworkPlan | None = None) -> VmLease:
        """A clone of ``vm`` (memory and disk; the caller keeps ``vm`` quiet) with its own capacity,
        and, when networked, its own gateway, port forwards and a freshly configured NIC."""
        grant = await self.admission.acquire(memory_mb, self.config.default_vcpus)
        gateway: EgressGateway | None = None
        forwards: tuple[PortForward, ...] = ()
        try:
            if net is None:
                clone = await fork_vm(vm, settings=self.settings, runtime_dir=self._runtime_dir)
            else:
                # the parent keeps its host ports: the clone's forwards get free ones
                net = dataclasses.replace(
                    net, forwards=tuple(f.model_copy(update={"host_port": 0}) for f in net.forwards))
                clone, gateway, forwards = await self._with_network(net, lambda user_net: fork_vm(
                    vm, settings=self.settings, runtime_dir=self._runtime_dir, user_net=user_net))
        except BaseException:
            grant.release()
            raise
        return VmLease(vm=clone, grant=grant, cgroup=self._attach_cgroup(clone, memory_mb),
                       restored_from_snapshot=True, gateway=gateway, forwards=forwards, net=net)

    async def _provision_restore(self, directory: Path) -> VmLease:
        """A VM restored from the snapshot ``directory`` (``Session.save``), with its own capacity."""
        options, _, _ = await asyncio.to_thread(read_snapshot_dir, directory)
        grant = await self.admission.acquire(options.memory_mb, options.vcpus)
        try:
            vm = await SandboxVm.restore_from(
                directory, settings=self.settings, runtime_dir=self._runtime_dir
            )
        except BaseException:
            grant.release()
            raise
        return VmLease(
            vm=vm,
            grant=grant,
            cgroup=self._attach_cgroup(vm, options.memory_mb),
            restored_from_snapshot=True,
        )

    @staticmethod
    async def _note_no_boot(on_boot_log: BootLogCallback | None, where: str) -> None:
        if on_boot_log is not None:
            await call_safely(on_boot_log, f"[sandbox] no boot: {where}", what="on_boot_log", logger=logger)

    async def _pooled_vm(self, language: Language) -> SandboxVm:
        """The warm pool's factory: a ready VM with the REPL (and a spare interpreter) warm.

        Made at a low CPU priority (when it can be raised again at checkout): on a small host a
        refill otherwise competes for the cores with the very run that just emptied the pool."""
        options = self._vm_options(language, self.config.default_memory_mb)
        nice = BACKGROUND_NICE if self._can_renice else 0
        vm = await self._make_vm(options, nice=nice)
        try:
            # Also after a restore: the pool counts a VM only once its REPL and spare interpreter are
            # up (and done with any post-restore reseed the agent queued), so a hit never waits.
            await warm_vm(vm)
        except BaseException:
            await vm.close()
            raise
        return vm

    async def _make_vm(
        self, options: VmOptions, *, on_boot_log: BootLogCallback | None = None, nice: int = 0,
        user_net: UserNetSpec | None = None,
    ) -> SandboxVm:
        """One VM: restored from the snapshot cache (or cold-booted into it), or cold-booted.
        ``user_net``: the NIC backend of a networked VM (``options.nic``)."""
        if self._snapshots is not None:
            vm, _ = await self._snapshots.restore_or_boot(
                options, runtime_dir=self._runtime_dir, overlay_pool=self._pool, on_boot_log=on_boot_log,
                nice=nice, user_net=user_net,
            )
            return vm
        return await SandboxVm.boot(
            options,
            settings=self.settings,
            vm_manager=self._vm_manager,
            overlay_pool=self._pool,
            runtime_dir=self._runtime_dir,
            on_boot_log=on_boot_log,
            nice=nice,
            user_net=user_net,
        )

    async def _boot(
        self, options: VmOptions, on_boot_log: BootLogCallback | None, user_net: UserNetSpec | None = None
    ) -> tuple[SandboxVm, int]:
        for attempt in range(1, _BOOT_ATTEMPTS + 1):
            try:
                return await self._make_vm(options, on_boot_log=on_boot_log, user_net=user_net), attempt
            except VmCapacityError:
                raise
            except SandboxTransientError as exc:
                if attempt >= _BOOT_ATTEMPTS or self._state is not SchedulerState.RUNNING:
                    raise
                logger.warning("VM boot failed (%s); retrying once with a fresh VM", exc.message)
        raise AssertionError("unreachable")  # pragma: no cover

    def _retire_later(self, lease: VmLease) -> None:
        """Retire in the background (off the caller's path); ``close()`` waits for it."""
        task = asyncio.get_running_loop().create_task(
            self._retire(lease), name=f"sbx-retire-{lease.vm.vm_id}"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("stopping a VM after its run failed: %r", task.exception())

    async def _retire(self, lease: VmLease) -> None:
        """Stop a leased VM and return its capacity (runs to completion even when cancelled)."""
        try:
            await lease.vm.close()
            if lease.cgroup is not None:
                await lease.cgroup.release()
        finally:
            lease.grant.release()
