"""AdmissionController with real asyncio tasks (no VMs): FIFO, timeouts, cancellation, no leaks."""

from __future__ import annotations

import asyncio
import random

import pytest

from exec_sandbox.config import SchedulerConfig
from exec_sandbox.errors import (
    SandboxInputError,
    SandboxPermanentError,
    SandboxTransientError,
    VmCapacityError,
)
from exec_sandbox.host.capacity import CgroupLimits, HostResources
from exec_sandbox.sandbox.admission import AdmissionController
from exec_sandbox.sandbox.grants import AdmissionState, Grant, compute_budget
from tests.support.loop import until

GiB = 1024**3


def controller(memory: int = 1000, cpus: float = 100.0, **kwargs: object) -> AdmissionController:
    kwargs.setdefault("vm_overhead_mb", 0)
    kwargs.setdefault("timeout_seconds", 30.0)
    return AdmissionController(memory, cpus, **kwargs)  # type: ignore[arg-type]


async def spin(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def assert_idle(ctrl: AdmissionController) -> None:
    stats = ctrl.stats()
    assert (stats.memory_in_use_mb, stats.cpu_in_use, stats.active, stats.waiting) == (0, 0, 0, 0)
    assert stats.memory_available_mb == ctrl.memory_budget_mb


async def test_immediate_grant_charges_overhead_and_releases() -> None:
    ctrl = AdmissionController(1000, 4.0, vm_overhead_mb=60)
    async with ctrl.reserve(256, vcpus=2) as grant:
        assert isinstance(grant, Grant)
        assert (grant.memory_mb, grant.cost_mb, grant.vcpus, grant.waited_ms) == (256, 316, 2, 0.0)
        stats = ctrl.stats()
        assert (stats.memory_in_use_mb, stats.cpu_in_use, stats.active) == (316, 2, 1)
        assert stats.memory_available_mb == 684
    assert grant.released
    assert_idle(ctrl)
    assert ctrl.stats().granted_total == 1


async def test_release_is_idempotent() -> None:
    ctrl = controller()
    grant = await ctrl.acquire(400)
    grant.release()
    grant.release()
    assert_idle(ctrl)
    # A double release must not have credited capacity twice.
    a = await ctrl.acquire(600)
    assert ctrl.try_acquire(600) is None
    a.release()


async def test_reserve_releases_on_exception() -> None:
    ctrl = controller()
    with pytest.raises(RuntimeError, match="boom"):
        async with ctrl.reserve(500):
            assert ctrl.stats().memory_in_use_mb == 500
            raise RuntimeError("boom")
    assert_idle(ctrl)


async def test_fifo_order() -> None:
    ctrl = controller(memory=100)
    order: list[str] = []
    first = await ctrl.acquire(100)

    async def job(name: str) -> None:
        async with ctrl.reserve(100):
            order.append(name)
            await spin(3)

    tasks = []
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        tasks.append(asyncio.create_task(job(name)))
        await until(lambda n=i + 1: ctrl.stats().waiting == n)
    first.release()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "d", "e"]
    assert_idle(ctrl)


async def test_big_head_blocks_smaller_later_requests() -> None:
    ctrl = controller(memory=1000)
    held = await ctrl.acquire(600)
    order: list[str] = []

    async def job(name: str, mb: int) -> Grant:
        grant = await ctrl.acquire(mb)
        order.append(name)
        return grant

    big = asyncio.create_task(job("big", 800))
    await until(lambda: ctrl.stats().waiting == 1)
    small = asyncio.create_task(job("small", 100))
    await until(lambda: ctrl.stats().waiting == 2)
    await spin()
    # 100 MiB would fit (600 + 100 <= 1000) but waits behind the 800 MiB head: strict FIFO.
    assert not small.done() and not big.done()
    assert ctrl.try_acquire(100) is None  # nor may background work jump the queue
    assert ctrl.stats().waiting_memory_mb == 900

    held.release()
    g_big, g_small = await asyncio.gather(big, small)
    assert order == ["big", "small"]
    assert ctrl.stats().memory_in_use_mb == 900
    g_big.release()
    g_small.release()
    assert_idle(ctrl)


async def test_timeout_raises_capacity_error_with_context() -> None:
    ctrl = controller(memory=500, vm_overhead_mb=50)
    held = await ctrl.acquire(400)  # costs 450
    with pytest.raises(VmCapacityError) as info:
        await ctrl.acquire(100, timeout=0.05)
    err = info.value
    assert isinstance(err, SandboxTransientError)
    ctx = err.context
    assert ctx["reason"] == "timeout"
    assert ctx["requested_mb"] == 150
    assert ctx["requested_memory_mb"] == 100
    assert ctx["available_mb"] == 50
    assert ctx["budget_mb"] == 500
    assert isinstance(ctx["waited_ms"], float) and ctx["waited_ms"] >= 0
    assert "admission timeout" in str(err)
    stats = ctrl.stats()
    assert stats.waiting == 0 and stats.timed_out_total == 1 and stats.memory_in_use_mb == 450
    held.release()
    assert_idle(ctrl)
    # Nothing stale is left in the queue: the next request is granted at once.
    async with ctrl.reserve(400) as grant:
        assert grant.waited_ms == 0.0


async def test_default_timeout_from_constructor() -> None:
    ctrl = controller(memory=100, timeout_seconds=0.02)
    held = await ctrl.acquire(100)
    with pytest.raises(VmCapacityError):
        await ctrl.acquire(100)
    held.release()
    assert_idle(ctrl)


async def test_zero_timeout_fails_immediately_unless_free() -> None:
    ctrl = controller(memory=100)
    grant = await ctrl.acquire(100, timeout=0)
    with pytest.raises(VmCapacityError) as info:
        await ctrl.acquire(1, timeout=0)
    assert info.value.context["reason"] == "timeout"
    assert info.value.context["waited_ms"] == 0.0
    grant.release()
    assert_idle(ctrl)


async def test_head_timing_out_unblocks_waiters_behind_it() -> None:
    ctrl = controller(memory=1000)
    held = await ctrl.acquire(600)
    big = asyncio.create_task(ctrl.acquire(800, timeout=0.05))
    await until(lambda: ctrl.stats().waiting == 1)
    small = asyncio.create_task(ctrl.acquire(100, timeout=None))
    await until(lambda: ctrl.stats().waiting == 2)
    with pytest.raises(VmCapacityError):
        await big
    grant = await small  # fits once the blocking head is gone, without any release
    assert ctrl.stats().memory_in_use_mb == 700
    grant.release()
    held.release()
    assert_idle(ctrl)


async def test_cancelled_waiter_leaves_queue_without_leaking() -> None:
    ctrl = controller(memory=100)
    held = await ctrl.acquire(100)
    victim = asyncio.create_task(ctrl.acquire(100))
    await until(lambda: ctrl.stats().waiting == 1)
    after = asyncio.create_task(ctrl.acquire(100))
    await until(lambda: ctrl.stats().waiting == 2)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert ctrl.stats().waiting == 1
    held.release()
    grant = await after
    assert ctrl.stats().active == 1
    grant.release()
    assert_idle(ctrl)


async def test_cancel_right_after_grant_returns_the_capacity() -> None:
    ctrl = controller(memory=100)
    held = await ctrl.acquire(100)
    waiter = asyncio.create_task(ctrl.acquire(100))
    await until(lambda: ctrl.stats().waiting == 1)
    held.release()  # grants to the waiter synchronously; the task has not resumed yet
    assert ctrl.stats().active == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert_idle(ctrl)


async def test_cancelled_head_unblocks_waiters_behind_it() -> None:
    ctrl = controller(memory=1000)
    held = await ctrl.acquire(600)
    big = asyncio.create_task(ctrl.acquire(800))
    await until(lambda: ctrl.stats().waiting == 1)
    small = asyncio.create_task(ctrl.acquire(100))
    await until(lambda: ctrl.stats().waiting == 2)
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    grant = await small
    grant.release()
    held.release()
    assert_idle(ctrl)


async def test_request_larger_than_budget_fails_at_once() -> None:
    ctrl = controller(memory=1000, cpus=2.0, vm_overhead_mb=60)
    with pytest.raises(VmCapacityError) as info:
        await ctrl.acquire(950)  # 950 + 60 > 1000
    ctx = info.value.context
    assert (ctx["reason"], ctx["requested_mb"], ctx["budget_mb"], ctx["waited_ms"]) == (
        "exceeds_budget",
        1010,
        1000,
        0.0,
    )
    with pytest.raises(VmCapacityError) as info:
        await ctrl.acquire(64, vcpus=3)
    assert info.value.context["reason"] == "exceeds_budget"
    assert info.value.context["requested_vcpus"] == 3
    assert ctrl.try_acquire(950) is None
    stats = ctrl.stats()
    assert stats.rejected_total == 2 and stats.waiting == 0
    # Exactly the budget fits.
    async with ctrl.reserve(940, vcpus=2):
        pass
    assert_idle(ctrl)


async def test_cpu_budget_limits_concurrency() -> None:
    ctrl = controller(memory=10_000, cpus=2.0)
    a = await ctrl.acquire(64, vcpus=1)
    b = await ctrl.acquire(64, vcpus=1)
    with pytest.raises(VmCapacityError) as info:
        await ctrl.acquire(64, vcpus=1, timeout=0)
    assert info.value.context["available_vcpus"] == 0
    a.release()
    c = await ctrl.acquire(64, vcpus=1, timeout=0)
    for g in (b, c):
        g.release()
    assert_idle(ctrl)


async def test_fractional_cpu_budget() -> None:
    ctrl = controller(memory=10_000, cpus=2 * 1.5)  # e.g. 2 CPUs x overcommit 1.5
    grants = [await ctrl.acquire(64, timeout=0) for _ in range(3)]
    assert ctrl.try_acquire(64) is None
    for g in grants:
        g.release()
    assert_idle(ctrl)


async def test_max_concurrent_vms_caps_the_count() -> None:
    ctrl = controller(memory=10_000, max_concurrent_vms=2)
    a = await ctrl.acquire(64)
    b = await ctrl.acquire(64)
    assert ctrl.try_acquire(64) is None
    waiter = asyncio.create_task(ctrl.acquire(64))
    await until(lambda: ctrl.stats().waiting == 1)
    a.release()
    c = await waiter
    assert ctrl.stats().active == 2
    for g in (b, c):
        g.release()
    assert_idle(ctrl)


async def test_try_acquire_never_queues() -> None:
    ctrl = controller(memory=200)
    grant = ctrl.try_acquire(150)
    assert grant is not None and grant.waited_ms == 0.0
    assert ctrl.try_acquire(100) is None
    assert ctrl.stats().waiting == 0
    grant.release()
    assert_idle(ctrl)


async def test_close_fails_waiters_and_refuses_new_requests() -> None:
    ctrl = controller(memory=100)
    held = await ctrl.acquire(100)
    waiters = [asyncio.create_task(ctrl.acquire(50)) for _ in range(3)]
    await until(lambda: ctrl.stats().waiting == 3)
    ctrl.close()
    ctrl.close()  # idempotent
    assert ctrl.state is AdmissionState.CLOSED
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, VmCapacityError) and r.context["reason"] == "closed" for r in results)
    with pytest.raises(VmCapacityError) as info:
        await ctrl.acquire(10)
    assert info.value.context["reason"] == "closed"
    assert ctrl.try_acquire(10) is None
    held.release()  # grants made before close stay releasable
    assert_idle(ctrl)


async def test_many_concurrent_tasks_never_exceed_budget_and_leak_nothing() -> None:
    rng = random.Random(1234)
    ctrl = AdmissionController(2000, 6.0, vm_overhead_mb=60, timeout_seconds=None)
    peak = {"memory": 0, "cpu": 0}
    outcomes = {"ok": 0, "timeout": 0, "cancelled": 0, "error": 0}

    async def job(mb: int, vcpus: int, timeout: float | None, fail: bool) -> None:
        async with ctrl.reserve(mb, vcpus, timeout=timeout):
            stats = ctrl.stats()
            assert stats.memory_in_use_mb <= stats.memory_budget_mb
            assert stats.cpu_in_use <= stats.cpu_budget
            peak["memory"] = max(peak["memory"], stats.memory_in_use_mb)
            peak["cpu"] = max(peak["cpu"], stats.cpu_in_use)
            await spin(rng.randint(0, 5))
            if fail:
                raise RuntimeError("job failed")

    tasks: list[asyncio.Task[None]] = []
    for _ in range(300):
        timeout = rng.choice([None, None, 0, 0.001, 0.5])
        tasks.append(
            asyncio.create_task(
                job(rng.choice([64, 128, 256, 512]), rng.randint(1, 3), timeout, rng.random() < 0.1)
            )
        )
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    for task in rng.sample(tasks, 40):
        task.cancel()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if result is None:
            outcomes["ok"] += 1
        elif isinstance(result, VmCapacityError):
            outcomes["timeout"] += 1
        elif isinstance(result, asyncio.CancelledError):
            outcomes["cancelled"] += 1
        else:
            assert isinstance(result, RuntimeError), result
            outcomes["error"] += 1
    assert_idle(ctrl)
    assert outcomes["ok"] > 0 and outcomes["cancelled"] > 0
    assert sum(outcomes.values()) == 300
    assert 0 < peak["memory"] <= 2000 and 0 < peak["cpu"] <= 6
    stats = ctrl.stats()
    assert stats.granted_total >= outcomes["ok"] + outcomes["error"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"memory_mb": 0}, "memory_mb"),
        ({"memory_mb": True}, "memory_mb"),
        ({"memory_mb": 1.5}, "memory_mb"),
        ({"memory_mb": 64, "vcpus": 0}, "vcpus"),
        ({"memory_mb": 64, "timeout": -1}, "timeout"),
        ({"memory_mb": 64, "timeout": float("nan")}, "timeout"),
    ],
)
async def test_bad_requests_are_input_errors(kwargs: dict[str, object], field: str) -> None:
    ctrl = controller()
    with pytest.raises(SandboxInputError) as info:
        await ctrl.acquire(**kwargs)  # type: ignore[arg-type]
    assert info.value.context["field"] == field
    assert_idle(ctrl)


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        ((0, 1.0), {}, "memory_budget_mb"),
        ((100, 0), {}, "cpu_budget"),
        ((100, 1.0), {"vm_overhead_mb": -1}, "vm_overhead_mb"),
        ((100, 1.0), {"max_concurrent_vms": 0}, "max_concurrent_vms"),
        ((100, 1.0), {"timeout_seconds": -0.5}, "timeout_seconds"),
    ],
)
def test_bad_constructor_arguments(args: tuple[object, ...], kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SandboxInputError) as info:
        AdmissionController(*args, **kwargs)  # type: ignore[arg-type]
    assert info.value.context["field"] == field


def resources(
    total_gib: float, *, cgroup_gib: float | None = None, cpus: int = 2, quota: float | None = None
) -> HostResources:
    return HostResources(
        memory_total_bytes=int(total_gib * GiB),
        memory_available_bytes=int(total_gib * GiB),
        cpu_count=cpus,
        cgroup=CgroupLimits(
            memory_max_bytes=None if cgroup_gib is None else int(cgroup_gib * GiB), cpu_max=quota
        ),
    )


def test_compute_budget_uses_the_smaller_of_ram_and_cgroup() -> None:
    config = SchedulerConfig(
        host_memory_reserve_mb=1024, memory_overcommit_ratio=2.0, cpu_overcommit_ratio=4.0
    )
    assert compute_budget(config, resources(8)) == ((8192 - 1024) * 2, 8.0)
    assert compute_budget(config, resources(8, cgroup_gib=4)) == ((4096 - 1024) * 2, 8.0)
    assert compute_budget(config, resources(8, cgroup_gib=64, cpus=4, quota=1.5)) == ((8192 - 1024) * 2, 6.0)


def test_compute_budget_refuses_a_reserve_that_leaves_nothing() -> None:
    config = SchedulerConfig(host_memory_reserve_mb=4096)
    with pytest.raises(SandboxPermanentError) as info:
        compute_budget(config, resources(8, cgroup_gib=4))
    assert info.value.context == {"host_memory_mb": 4096, "host_memory_reserve_mb": 4096}


async def test_from_config() -> None:
    config = SchedulerConfig(
        host_memory_reserve_mb=512,
        memory_overcommit_ratio=1.5,
        cpu_overcommit_ratio=2.0,
        admission_timeout_seconds=7,
        vm_overhead_mb=40,
        max_concurrent_vms=3,
    )
    ctrl = AdmissionController.from_config(config, resources(2, cpus=2))
    assert ctrl.memory_budget_mb == int((2048 - 512) * 1.5)
    assert ctrl.cpu_budget == 4.0
    assert ctrl.timeout_seconds == 7.0
    assert ctrl.vm_overhead_mb == 40
    assert ctrl.max_concurrent_vms == 3
    assert ctrl.cost_mb(256) == 296


async def test_from_config_probes_this_host() -> None:
    ctrl = AdmissionController.from_config(SchedulerConfig(host_memory_reserve_mb=0))
    assert ctrl.memory_budget_mb > 0 and ctrl.cpu_budget > 0


def test_max_vms_for_pool_sizing() -> None:
    ctrl = AdmissionController(1000, 3.0, vm_overhead_mb=60)
    assert ctrl.max_vms(256) == 3  # 3 x 316 <= 1000, and 3 vCPUs
    assert ctrl.max_vms(128) == 3  # CPU-bound: 5 would fit in memory
    assert ctrl.max_vms(64, vcpus=2) == 1
    assert ctrl.max_vms(1000) == 0
    assert AdmissionController(10_000, 100.0, max_concurrent_vms=4).max_vms(64) == 4
    with pytest.raises(SandboxInputError):
        ctrl.max_vms(0)
