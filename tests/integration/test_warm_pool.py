"""WarmPool with real guests under TCG: pooled VMs come from the L1 snapshot cache (one cold boot
per module fills it), except where a test needs the slow cold-boot path on purpose.

Every test runs with ``sbx_leaks``: no QEMU child, overlay, socket or RAM file may remain.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from exec_sandbox.protocol.agent import Language
from exec_sandbox.sandbox.admission import AdmissionController
from exec_sandbox.sandbox.warm_pool import PooledVm, WarmPool, WarmPoolState
from exec_sandbox.settings import Settings
from exec_sandbox.vm.sandbox_vm import SandboxVm
from exec_sandbox.vm.snapshots import SnapshotCache
from exec_sandbox.vm.spec import VmOptions
from exec_sandbox.vm_manager import VmManager
from tests.integration.conftest import LeakChecker, child_processes

pytestmark = pytest.mark.integration

MEMORY_MB = 256
OPTIONS = VmOptions(language="python", memory_mb=MEMORY_MB, vcpus=1, boot_timeout_s=120.0)


@pytest.fixture(scope="module")
def cache_dir(sbx_settings: Settings, sbx_images: VmManager) -> Iterator[Path]:
    """A snapshot cache holding a warm python guest (one cold boot for the whole module)."""
    root = Path(tempfile.mkdtemp(prefix="sbx-pool-", dir="/var/tmp"))
    runtime = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))

    async def fill() -> None:
        async with SnapshotCache(root, settings=sbx_settings, vm_manager=sbx_images) as cache:
            vm, _ = await cache.restore_or_boot(OPTIONS, runtime_dir=runtime)
            await vm.close()
            await cache.wait_saved()
            assert len(cache.entries()) == 1

    try:
        asyncio.run(fill())
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


def restoring_factory(
    cache: SnapshotCache, leaks: LeakChecker, restored: list[bool]
) -> Callable[[Language], Awaitable[SandboxVm]]:
    async def factory(language: Language) -> SandboxVm:
        vm, was_restored = await cache.restore_or_boot(
            OPTIONS.model_copy(update={"language": language}),
            runtime_dir=leaks.runtime_dir,
            vm_id=leaks.new_id(),
        )
        restored.append(was_restored)
        return vm

    return factory


async def wait_for(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def admission_for(vms: int) -> AdmissionController:
    return AdmissionController(vms * (MEMORY_MB + 64), 8, vm_overhead_mb=64, timeout_seconds=60)


async def test_pool_fills_serves_hits_and_refills_after_checkout(
    cache_dir: Path, sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    admission = admission_for(4)
    restored: list[bool] = []
    cache = SnapshotCache(cache_dir, settings=sbx_settings, vm_manager=sbx_images)
    pool = WarmPool(
        restoring_factory(cache, sbx_leaks, restored), 2, admission, languages=["python"], memory_mb=MEMORY_MB
    )
    assert await pool.checkout("python") is None  # not started yet: a miss, never an error
    async with pool:
        await wait_for(lambda: pool.idle_count("python") == 2)
        assert admission.stats().active == 2  # idle VMs count against the budget
        assert await pool.checkout("javascript") is None  # a language the pool does not keep

        t = time.perf_counter()
        hit = await pool.checkout("python")
        assert hit is not None
        result = await hit.vm.exec("print(1)")
        checkout_exec_ms = (time.perf_counter() - t) * 1000
        assert (result.exit_code, result.stdout) == (0, "1\n")
        assert hit.grant is not None and not hit.grant.released
        assert pool.stats.hits == 1 and pool.stats.misses == 2
        print(f"warm pool checkout+exec print(1): {checkout_exec_ms:.1f} ms")

        # The checked-out VM is the caller's; the pool makes a replacement in the background.
        await wait_for(lambda: pool.idle_count("python") == 2)
        assert pool.stats.created == 3
        assert admission.stats().active == 3
        await hit.vm.close()
        hit.grant.release()
    assert pool.state is WarmPoolState.CLOSED
    assert admission.stats().active == 0 and admission.stats().memory_in_use_mb == 0
    assert all(restored), "pooled VMs should come from the snapshot cache"
    await pool.drain()  # idempotent
    await cache.aclose()


async def test_drain_mid_refill_leaves_nothing_behind(
    sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    admission = admission_for(2)
    booting = asyncio.Event()

    async def cold_factory(language: Language) -> SandboxVm:
        booting.set()
        return await SandboxVm.boot(
            OPTIONS.model_copy(update={"language": language}),
            settings=sbx_settings,
            vm_manager=sbx_images,
            runtime_dir=sbx_leaks.runtime_dir,
            vm_id=sbx_leaks.new_id(),
        )

    await sbx_images.aget_bundle("python")  # an image build must not stretch the boot window
    pool = WarmPool(cold_factory, 2, admission, languages=["python"], memory_mb=MEMORY_MB)
    await pool.start()
    try:
        await booting.wait()
        # Drain while QEMU is up but the guest is still booting.
        await wait_for(lambda: bool(sbx_leaks.qemu_children()), timeout=60)
        assert pool.refilling == "python" and pool.idle_count() == 0
    finally:
        await pool.drain()
    assert pool.state is WarmPoolState.CLOSED
    assert admission.stats().active == 0
    await sbx_leaks.assert_clean()
    assert await pool.checkout("python") is None


async def test_drain_with_idle_vms_and_a_refill_in_flight(
    cache_dir: Path, sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    admission = admission_for(4)
    cache = SnapshotCache(cache_dir, settings=sbx_settings, vm_manager=sbx_images)
    pool = WarmPool(
        restoring_factory(cache, sbx_leaks, []), 3, admission, languages=["python"], memory_mb=MEMORY_MB
    )
    await pool.start()
    await wait_for(lambda: pool.idle_count() >= 1 and pool.refilling is not None)
    await pool.drain()
    assert admission.stats().active == 0
    await sbx_leaks.assert_clean()
    await cache.aclose()


async def test_dead_idle_vm_is_dropped_and_replaced(
    cache_dir: Path, sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    admission = admission_for(2)
    cache = SnapshotCache(cache_dir, settings=sbx_settings, vm_manager=sbx_images)
    pool = WarmPool(
        restoring_factory(cache, sbx_leaks, []), 1, admission, languages=["python"], memory_mb=MEMORY_MB
    )
    async with pool:
        await wait_for(lambda: pool.idle_count() == 1)
        victim = pool._slots["python"].idle[0].vm
        pid = victim.machine.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: not victim.alive, timeout=30)
        assert await pool.check_health() == 1
        assert pool.stats.unhealthy_dropped == 1
        await wait_for(lambda: pool.idle_count() == 1)
        hit = await pool.checkout("python")
        assert hit is not None and hit.vm is not victim
        await use_once(hit, 3)
    assert admission.stats().active == 0
    await cache.aclose()


async def use_once(hit: PooledVm | None, n: int) -> None:
    """Run one exec in a checked-out VM, then retire it as its caller would (close, release)."""
    assert hit is not None
    assert (await hit.vm.exec(f"print({n})")).stdout == f"{n}\n"
    await hit.vm.close()
    assert hit.grant is not None
    hit.grant.release()


async def test_parallel_refills_make_working_vms(
    cache_dir: Path, sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    admission = admission_for(3)
    cache = SnapshotCache(cache_dir, settings=sbx_settings, vm_manager=sbx_images)
    pool = WarmPool(
        restoring_factory(cache, sbx_leaks, []), 2, admission, languages=["python"], memory_mb=MEMORY_MB,
        refill_concurrency=2,
    )
    async with pool:
        await wait_for(lambda: pool.refills_in_flight == 2)
        await wait_for(lambda: pool.idle_count() == 2)
        hits = [await pool.checkout("python") for _ in range(2)]
        for n, hit in enumerate(hits):
            await use_once(hit, n * 7)
    assert admission.stats().active == 0
    await sbx_leaks.assert_clean()
    await cache.aclose()


async def test_checkout_pings_a_quiet_vm_and_drops_a_hung_one(
    cache_dir: Path, sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    """A VM heard from recently is handed out without a round trip; a quiet one is pinged first,
    and one whose QEMU is alive but does not answer (stopped) is dropped, not handed out."""
    admission = admission_for(3)
    cache = SnapshotCache(cache_dir, settings=sbx_settings, vm_manager=sbx_images)
    pool = WarmPool(
        restoring_factory(cache, sbx_leaks, []), 2, admission, languages=["python"], memory_mb=MEMORY_MB,
        checkout_ping_after_s=3600.0, ping_timeout_s=1.0,
    )
    async with pool:
        await wait_for(lambda: pool.idle_count() == 2)
        fresh = await pool.checkout("python")
        assert fresh is not None and pool.stats.checkout_pings == 0
        await use_once(fresh, 4)

        await wait_for(lambda: pool.idle_count() == 2)
        pool.checkout_ping_after_s = 0.0  # everything counts as quiet now
        hung = pool._slots["python"].idle[0].vm
        # Its vCPU stops (QEMU itself stays up and answers QMP): the guest agent cannot answer.
        await hung.machine.execute_qmp("stop")
        hit = await pool.checkout("python")
        assert hit is not None and hit.vm is not hung
        assert pool.stats.checkout_pings == 2 and pool.stats.unhealthy_dropped == 1
        assert not hung.alive
        await use_once(hit, 5)
    assert admission.stats().active == 0
    await sbx_leaks.assert_clean()
    await cache.aclose()


async def test_idle_vms_give_capacity_back_to_a_queued_foreground_request(
    cache_dir: Path, sbx_settings: Settings, sbx_images: VmManager, sbx_leaks: LeakChecker
) -> None:
    admission = admission_for(2)  # room for exactly the two pooled VMs
    cache = SnapshotCache(cache_dir, settings=sbx_settings, vm_manager=sbx_images)
    pool = WarmPool(
        restoring_factory(cache, sbx_leaks, []), 2, admission, languages=["python"], memory_mb=MEMORY_MB
    )
    async with pool:
        await wait_for(lambda: pool.idle_count() == 2)
        assert admission.try_acquire(MEMORY_MB) is None  # the budget is all in the pool
        # A foreground request (e.g. another language, which the pool cannot serve) queues ...
        grant = await admission.acquire(MEMORY_MB, timeout=30)
        # ... and gets capacity because the pool closed an idle VM for it.
        assert pool.stats.yielded == 1 and pool.idle_count() == 1
        # While the foreground holds it, the pool cannot (and does not) take it back.
        await asyncio.sleep(1.0)
        assert pool.idle_count() == 1 and admission.stats().active == 2
        grant.release()
        await wait_for(lambda: pool.idle_count() == 2)
    assert admission.stats().active == 0
    assert not [c for c in child_processes() if c[1].startswith("qemu-system")]
    await cache.aclose()
