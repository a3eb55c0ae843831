"""WarmPool bookkeeping without VMs: factories that fail or never finish, grants, lifecycle.

The factories here are ordinary callables of the documented shape that never produce a VM (they
raise or wait); everything that produces real VMs is in tests/integration/test_warm_pool.py.
"""

from __future__ import annotations

import asyncio

import pytest

from exec_sandbox.errors import SandboxTransientError
from exec_sandbox.protocol.agent import Language
from exec_sandbox.sandbox.admission import AdmissionController
from exec_sandbox.sandbox.foreground import ForegroundActivity
from exec_sandbox.sandbox.warm_pool import WarmPool, WarmPoolState
from exec_sandbox.vm.sandbox_vm import SandboxVm


def admission(vms: int = 4) -> AdmissionController:
    return AdmissionController(vms * 256, 8, vm_overhead_mb=0, timeout_seconds=5)


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_invalid_arguments_are_rejected() -> None:
    async def factory(language: Language) -> SandboxVm:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="size_per_language"):
        WarmPool(factory, -1, None, languages=["python"], memory_mb=256)
    with pytest.raises(ValueError, match="must be > 0"):
        WarmPool(factory, 1, None, languages=["python"], memory_mb=256, health_interval_s=0)


async def test_failing_factory_releases_each_grant_and_backs_off() -> None:
    adm = admission()
    calls: list[tuple[Language, int]] = []

    async def failing(language: Language) -> SandboxVm:
        calls.append((language, adm.stats().active))
        raise SandboxTransientError("no VM today")

    pool = WarmPool(failing, 2, adm, languages=["python"], memory_mb=256, retry_delay_s=0.01)
    async with pool:
        await wait_for(lambda: pool.stats.create_failures >= 3)
        assert await pool.checkout("python") is None
    assert adm.stats().active == 0
    # Each attempt held exactly one grant (its own; the failed ones before it were released).
    assert calls and all(call == ("python", 1) for call in calls)
    assert pool.state is WarmPoolState.CLOSED


async def test_drain_cancels_a_refill_in_flight_and_returns_its_grant() -> None:
    adm = admission()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def never_finishes(language: Language) -> SandboxVm:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    pool = WarmPool(never_finishes, 1, adm, languages=["python", "javascript"], memory_mb=256)
    await pool.start()
    await pool.start()  # idempotent
    await started.wait()
    assert pool.refilling in ("python", "javascript") and adm.stats().active == 1
    await pool.drain()
    assert cancelled.is_set()
    assert adm.stats().active == 0 and pool.refilling is None
    await pool.drain()  # idempotent
    with pytest.raises(SandboxTransientError, match="closed"):
        await pool.start()


async def test_refill_never_takes_capacity_a_foreground_request_waits_for() -> None:
    adm = admission(vms=1)
    foreground = await adm.acquire(256)  # the whole budget
    waiter = asyncio.ensure_future(adm.acquire(256, timeout=5))  # and someone queued behind it
    await asyncio.sleep(0)

    async def factory(language: Language) -> SandboxVm:
        raise AssertionError("the pool must not get capacity")

    pool = WarmPool(
        factory, 1, adm, languages=["python"], memory_mb=256, retry_delay_s=0.01, yield_poll_s=0.01
    )
    async with pool:
        foreground.release()  # capacity goes to the queued request, not to the pool
        second = await waiter
        await wait_for(lambda: pool.stats.refill_deferred >= 2)
        assert pool.stats.created == 0 and pool.stats.create_failures == 0
        second.release()


async def test_zero_size_pool_never_calls_the_factory() -> None:
    async def factory(language: Language) -> SandboxVm:
        raise AssertionError("never called")

    async with WarmPool(factory, 0, admission(), languages=["python"], memory_mb=256) as pool:
        await asyncio.sleep(0.05)
        assert await pool.checkout("python") is None
        assert pool.stats.misses == 1 and pool.idle_count() == 0


async def test_parallel_refills_stay_within_concurrency_and_drain_cancels_them_all() -> None:
    adm = admission(8)
    running: list[Language] = []
    peak = 0
    cancelled = 0

    async def slow(language: Language) -> SandboxVm:
        nonlocal peak, cancelled
        running.append(language)
        peak = max(peak, len(running))
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise
        finally:
            running.remove(language)
        raise AssertionError("unreachable")

    with pytest.raises(ValueError, match="refill_concurrency"):
        WarmPool(slow, 1, adm, languages=["python"], memory_mb=256, refill_concurrency=0)
    pool = WarmPool(slow, 5, adm, languages=["python"], memory_mb=256, refill_concurrency=3)
    await pool.start()
    await wait_for(lambda: pool.refills_in_flight == 3)
    await asyncio.sleep(0.05)  # no fourth one starts while three are in flight
    assert peak == 3 and adm.stats().active == 3 and pool.refilling == "python"
    await pool.drain()
    assert cancelled == 3 and not running
    assert adm.stats().active == 0 and pool.refills_in_flight == 0


async def test_refill_waits_for_a_gap_in_foreground_work() -> None:
    adm = admission(4)
    fg = ForegroundActivity()
    calls = 0

    async def failing(language: Language) -> SandboxVm:
        nonlocal calls
        calls += 1
        raise SandboxTransientError("no VM today")

    with pytest.raises(ValueError, match="max_refill_defer_s"):
        WarmPool(failing, 1, adm, languages=["python"], memory_mb=256, max_refill_defer_s=-1)
    busy = fg.track()
    busy.__enter__()
    pool = WarmPool(
        failing, 1, adm, languages=["python"], memory_mb=256, foreground=fg, max_refill_defer_s=30.0,
        retry_delay_s=0.01,
    )
    async with pool:
        await wait_for(lambda: pool.stats.refill_waited_for_foreground == 1)
        await asyncio.sleep(0.1)
        assert calls == 0  # nothing is made while a foreground operation runs
        busy.__exit__(None, None, None)
        await wait_for(lambda: calls >= 1)
    # Under sustained foreground load a refill still happens after max_refill_defer_s.
    calls = 0
    with fg.track():
        pool = WarmPool(
            failing, 1, adm, languages=["python"], memory_mb=256, foreground=fg, max_refill_defer_s=0.05,
            retry_delay_s=0.01,
        )
        async with pool:
            await wait_for(lambda: calls >= 2)
    assert adm.stats().active == 0
